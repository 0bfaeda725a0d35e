//! `FileReplicator`: one-way sync of a source tree onto a [`SyncTarget`], and verification of
//! the target against its manifest.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use ha_core::{Validate, metric};
use nix::fcntl::OFlag;

use super::config::FileSyncConfig;
use super::digest::{self, Hasher, Sha256};
use super::error::FileSyncError;
use super::local::LocalTarget;
use super::manifest::{Manifest, ManifestEntry};
use super::report::{
    DeletionRefusal, DeletionsRefused, Failure, Mismatch, Modified, RefusalReason, Refused,
    SyncReport, VerifyReport,
};
use super::source::{self, SourceEntry, SourceFile, SourceListing};
use super::target::{self, EntryMeta, FileAttrs, Mtime, SyncTarget};

/// One-way replication of a local source directory onto a [`SyncTarget`].
///
/// Each [`sync`](Self::sync) lists both trees (never following links), copies what changed,
/// removes what the source no longer has (within the safety rules of [`FileSyncConfig`]),
/// and records what it wrote in the target's manifest. [`verify_target`](Self::verify_target)
/// re-hashes the target against that manifest. See the [module docs](super) for the rules.
///
/// Cloning is cheap and clones share the replicator. The blocking methods
/// ([`sync_blocking`](Self::sync_blocking), [`verify_target_blocking`](Self::verify_target_blocking))
/// do the work on the calling thread plus scoped threads of their own (one to list the
/// target while the source is listed, `parallelism - 1` to hash and copy); the async ones run
/// the blocking ones on Tokio's blocking pool.
#[derive(Clone)]
pub struct FileReplicator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FileReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileReplicator")
            .field("source", &self.inner.source)
            .field("target", &self.inner.target.describe())
            .field("config", &self.inner.config)
            .finish()
    }
}

struct Inner {
    source: PathBuf,
    target: Arc<dyn SyncTarget>,
    config: FileSyncConfig,
}

/// The target's manifest as a run found it.
struct LoadedManifest {
    manifest: Manifest,
    /// Whether there was one.
    found: bool,
    /// Why it was unusable, if it was.
    discarded: Option<String>,
}

/// What happened to one source file or link.
enum Outcome {
    Unchanged(ManifestEntry),
    Metadata(ManifestEntry),
    Copied { entry: ManifestEntry, bytes: u64 },
    Linked(ManifestEntry),
}

impl FileReplicator {
    /// A replicator from the directory `source` to `target`. Fails if `config` is invalid;
    /// neither side is touched until the first run.
    pub fn new(
        source: impl Into<PathBuf>,
        target: impl SyncTarget,
        config: FileSyncConfig,
    ) -> Result<Self, FileSyncError> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                source: source.into(),
                target: Arc::new(target),
                config,
            }),
        })
    }

    /// A replicator from the directory `source` to the local directory `target` (a
    /// [`LocalTarget`] with the config's buffer size).
    pub fn local(
        source: impl Into<PathBuf>,
        target: impl Into<PathBuf>,
        config: FileSyncConfig,
    ) -> Result<Self, FileSyncError> {
        let target = LocalTarget::new(target).with_buffer_size(config.buffer_size);
        Self::new(source, target, config)
    }

    /// The source root.
    pub fn source(&self) -> &Path {
        &self.inner.source
    }

    /// The target.
    pub fn target(&self) -> &dyn SyncTarget {
        &*self.inner.target
    }

    /// The config.
    pub fn config(&self) -> &FileSyncConfig {
        &self.inner.config
    }

    /// Runs one sync on Tokio's blocking pool (call it within a Tokio runtime). Dropping the
    /// future does not stop a run that has started: it finishes in the background, and the
    /// target's lock keeps the next run out until it has.
    pub async fn sync(&self) -> Result<SyncReport, FileSyncError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.sync())
            .await
            .map_err(join_error)?
    }

    /// Runs one sync on this thread (and worker threads it starts). `Err` when the run could
    /// not go on safely (source root or target unavailable, target busy, manifest not
    /// written); failures of single entries are in the report's
    /// [`failed`](SyncReport::failed) list instead.
    pub fn sync_blocking(&self) -> Result<SyncReport, FileSyncError> {
        self.inner.sync()
    }

    /// Re-hashes every file on the target and compares the target with its manifest, on
    /// Tokio's blocking pool. Changes nothing (except removing temporary files an interrupted
    /// run left).
    pub async fn verify_target(&self) -> Result<VerifyReport, FileSyncError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.verify())
            .await
            .map_err(join_error)?
    }

    /// [`verify_target`](Self::verify_target) on this thread (and worker threads it starts).
    pub fn verify_target_blocking(&self) -> Result<VerifyReport, FileSyncError> {
        self.inner.verify()
    }
}

fn join_error(error: tokio::task::JoinError) -> FileSyncError {
    if error.is_panic() {
        std::panic::resume_unwind(error.into_panic());
    }
    FileSyncError::Task {
        detail: error.to_string(),
    }
}

/// Runs `a` on a scoped thread and `b` on this one, and returns both results.
fn both<A: Send, B>(a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B) -> (A, B) {
    std::thread::scope(|scope| {
        let span = tracing::Span::current();
        let a = scope.spawn(move || span.in_scope(a));
        let b = b();
        let a = a
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (a, b)
    })
}

/// Whether `path` or one of its ancestors is in `set`.
fn within(set: &BTreeSet<String>, path: &str) -> bool {
    let mut path = path;
    loop {
        if set.contains(path) {
            return true;
        }
        if path.is_empty() {
            return false;
        }
        path = target::parent(path);
    }
}

impl Inner {
    fn sync(&self) -> Result<SyncReport, FileSyncError> {
        let span = tracing::info_span!("file_sync", sync = %self.config.name,
            source = %self.source.display(), target = %self.target.describe());
        let _entered = span.enter();
        let started = Instant::now();
        let result = self.sync_locked(started);
        let name = self.config.name.clone();
        let elapsed = started.elapsed();
        metrics::histogram!(metric::REPLICATION_FILE_SYNC_DURATION_SECONDS, "sync" => name.clone())
            .record(elapsed.as_secs_f64());
        match &result {
            Ok(report) => {
                let outcome = if report.failed.is_empty() {
                    "complete"
                } else {
                    "incomplete"
                };
                metrics::counter!(metric::REPLICATION_FILE_SYNCS_TOTAL, "sync" => name.clone(),
                    "outcome" => outcome)
                .increment(1);
                metrics::counter!(metric::REPLICATION_FILE_COPIED_TOTAL, "sync" => name.clone())
                    .increment(report.files_copied);
                metrics::counter!(metric::REPLICATION_FILE_COPIED_BYTES_TOTAL,
                    "sync" => name.clone())
                .increment(report.bytes_copied);
                metrics::counter!(metric::REPLICATION_FILE_DELETED_TOTAL, "sync" => name.clone())
                    .increment(report.deleted);
                metrics::counter!(metric::REPLICATION_FILE_FAILURES_TOTAL, "sync" => name.clone())
                    .increment(report.failed.len() as u64);
                if let Some(refused) = &report.deletions_refused {
                    let reason = match refused.reason {
                        DeletionRefusal::Disabled => "disabled",
                        DeletionRefusal::SourceIncomplete { .. } => "source_incomplete",
                        DeletionRefusal::EmptySource => "empty_source",
                        DeletionRefusal::OverCap { .. } => "over_cap",
                    };
                    metrics::counter!(metric::REPLICATION_FILE_DELETIONS_REFUSED_TOTAL,
                        "sync" => name, "reason" => reason)
                    .increment(1);
                }
                tracing::info!(
                    copied = report.files_copied,
                    bytes = report.bytes_copied,
                    unchanged = report.unchanged,
                    metadata = report.metadata_updated,
                    links = report.symlinks_written,
                    dirs = report.dirs_created,
                    deleted = report.deleted,
                    refused = report.refused.len(),
                    failed = report.failed.len(),
                    ms = elapsed.as_millis(),
                    "file sync finished"
                );
            }
            Err(e) => {
                metrics::counter!(metric::REPLICATION_FILE_SYNCS_TOTAL, "sync" => name,
                    "outcome" => "failed")
                .increment(1);
                tracing::warn!(error = %e, "file sync failed");
            }
        }
        result
    }

    /// Reads the target's manifest; an unparseable one is replaced by an empty one and the
    /// reason kept.
    fn load_manifest(&self) -> Result<LoadedManifest, FileSyncError> {
        let bytes = self.target.read_manifest()?;
        let (manifest, discarded) = match bytes.as_deref().map(Manifest::parse) {
            None => (Manifest::default(), None),
            Some(Ok(manifest)) => (manifest, None),
            Some(Err(reason)) => {
                tracing::warn!(%reason, "target manifest unreadable; comparing by hash");
                (Manifest::default(), Some(reason))
            }
        };
        Ok(LoadedManifest {
            manifest,
            found: bytes.is_some(),
            discarded,
        })
    }

    fn sync_locked(&self, started: Instant) -> Result<SyncReport, FileSyncError> {
        let target = &*self.target;
        let _lock = target.lock()?;
        let synced_at = Mtime::from(SystemTime::now());
        // The two sides are listed at the same time: each is mostly waiting on `lstat`.
        let (source, target_side) = both(
            || source::list_source(&self.source),
            || Ok::<_, FileSyncError>((target.list()?, self.load_manifest()?)),
        );
        let mut source = source?;
        let (
            listed,
            LoadedManifest {
                manifest: old,
                found,
                discarded,
            },
        ) = target_side?;
        let mut report = SyncReport {
            manifest_discarded: discarded,
            refused: std::mem::take(&mut source.refused),
            failed: source.errors.clone(),
            ..SyncReport::default()
        };
        // Directories whose entries change this run: their mtime is set again at the end.
        let mut touched: BTreeSet<String> = BTreeSet::new();

        // Directories the owner cannot write into (a source dir of mode 0o555, say) are made
        // writable for the run; their mode is set back at the end.
        let mut made_writable: Vec<(&str, FileAttrs)> = Vec::new();
        for (path, meta) in &listed {
            if let EntryMeta::Dir { mode, mtime } = *meta
                && mode & 0o700 != 0o700
            {
                let attrs = FileAttrs {
                    mode: mode | 0o700,
                    mtime,
                };
                match target.set_attrs(path, attrs) {
                    Ok(()) => {
                        touched.insert(path.clone());
                        made_writable.push((path, FileAttrs { mode, mtime }));
                    }
                    Err(e) => report.failed.push(Failure::new(path, &e)),
                }
            }
        }

        let deleted = self.delete_extras(&source, &listed, &mut report, &mut touched);

        // Directories, parents first (the map is sorted, and a parent sorts before its
        // children), so files can go into them.
        let mut failed_dirs: BTreeSet<String> = BTreeSet::new();
        for (path, entry) in &source.entries {
            if !matches!(entry, SourceEntry::Dir(_)) || within(&failed_dirs, path) {
                continue;
            }
            let current = listed.get(path).filter(|_| !deleted.contains(path));
            if current.is_some_and(EntryMeta::is_dir) {
                continue;
            }
            let created = match current {
                // A file or link where the source has a directory: replaced (the path stays,
                // so this is not a deletion).
                Some(_) => target.remove(path).and_then(|()| target.create_dir(path)),
                None => target.create_dir(path),
            };
            touched.insert(target::parent(path).to_owned());
            touched.insert(path.clone());
            match created {
                Ok(()) => report.dirs_created += 1,
                Err(e) => {
                    tracing::warn!(path, error = %e, "could not create directory");
                    report.failed.push(Failure::new(path, &e));
                    failed_dirs.insert(path.clone());
                }
            }
        }

        // Files and links, on the worker threads.
        let mut work: Vec<(&str, &SourceEntry)> = Vec::new();
        for (path, entry) in &source.entries {
            if matches!(entry, SourceEntry::Dir(_)) || within(&failed_dirs, path) {
                continue;
            }
            if listed.get(path).is_some_and(EntryMeta::is_dir) && !deleted.contains(path) {
                // The directory there could not be removed: refused above, or its removal
                // failed (already reported).
                if report.deletions_refused.is_some() {
                    report.refused.push(Refused {
                        path: path.clone(),
                        reason: RefusalReason::NeedsDeletion,
                    });
                }
                continue;
            }
            work.push((path.as_str(), entry));
        }
        let hashed = AtomicU64::new(0);
        let outcomes = self.parallel(&work, |&(path, entry)| {
            let current = listed.get(path).filter(|_| !deleted.contains(path));
            let result = match entry {
                SourceEntry::File(file) => {
                    self.sync_file(path, file, current, old.entries.get(path), &old, &hashed)
                }
                SourceEntry::Symlink(text) => self.sync_link(path, text, current),
                SourceEntry::Dir(_) => Err(FileSyncError::InvalidPath {
                    path: path.to_owned(),
                    reason: "directories are not synced by workers",
                }),
            };
            if let Err(e) = &result {
                tracing::warn!(path, error = %e, "entry not synced");
            }
            result
        });

        // The new manifest: what the target holds now. Entries not synced this run keep their
        // old record while the target still has them.
        let mut manifest = Manifest {
            synced_at,
            ..Manifest::default()
        };
        for (path, entry) in &old.entries {
            let on_target = listed.contains_key(path) && !deleted.contains(path);
            if on_target || source.entries.contains_key(path) {
                manifest.entries.insert(path.clone(), entry.clone());
            }
        }
        for (path, entry) in &source.entries {
            if let SourceEntry::Dir(attrs) = entry
                && !within(&failed_dirs, path)
            {
                manifest.entries.insert(
                    path.clone(),
                    ManifestEntry::Dir {
                        mode: attrs.mode,
                        mtime: attrs.mtime,
                    },
                );
            }
        }
        report.bytes_hashed = hashed.into_inner();
        for (&(path, _), outcome) in work.iter().zip(outcomes) {
            let entry = match outcome {
                Ok(Outcome::Unchanged(entry)) => {
                    report.unchanged += 1;
                    entry
                }
                Ok(Outcome::Metadata(entry)) => {
                    report.metadata_updated += 1;
                    entry
                }
                Ok(Outcome::Copied { entry, bytes }) => {
                    report.files_copied += 1;
                    report.bytes_copied += bytes;
                    touched.insert(target::parent(path).to_owned());
                    entry
                }
                Ok(Outcome::Linked(entry)) => {
                    report.symlinks_written += 1;
                    touched.insert(target::parent(path).to_owned());
                    entry
                }
                Err(e) => {
                    // A temporary file may have come and gone in the directory.
                    touched.insert(target::parent(path).to_owned());
                    report.failed.push(Failure::new(path, &e));
                    continue;
                }
            };
            manifest.entries.insert(path.to_owned(), entry);
        }

        // Every change above is made durable before the manifest that records it. An
        // unchanged manifest is rewritten only to move `synced_at` past racy mtimes.
        let racy = manifest
            .entries
            .values()
            .any(|entry| matches!(entry, ManifestEntry::File { mtime, .. } if old.is_racy(*mtime)));
        if found && report.manifest_discarded.is_none() && manifest.entries == old.entries && !racy
        {
            target.flush()?;
        } else {
            target.write_manifest(&manifest.to_bytes())?;
            touched.insert(String::new());
        }

        // Directory attributes last: creating, renaming and removing entries changes a
        // directory's mtime, and the manifest write changes the root's.
        let dirs =
            source
                .root
                .iter()
                .map(|attrs| ("", *attrs))
                .chain(
                    source
                        .entries
                        .iter()
                        .filter_map(|(path, entry)| match entry {
                            SourceEntry::Dir(attrs) => Some((path.as_str(), *attrs)),
                            _ => None,
                        }),
                );
        // Directories made writable that the source does not have as directories (kept,
        // or left because deletions were refused) get their own attributes back.
        let restore = made_writable.into_iter().filter(|(path, _)| {
            let source_dir =
                path.is_empty() || matches!(source.entries.get(*path), Some(SourceEntry::Dir(_)));
            !source_dir && !deleted.contains(*path)
        });
        for (path, attrs) in dirs.chain(restore) {
            if within(&failed_dirs, path) {
                continue;
            }
            let current = EntryMeta::Dir {
                mode: attrs.mode,
                mtime: attrs.mtime,
            };
            if !touched.contains(path) && listed.get(path) == Some(&current) {
                continue;
            }
            if let Err(e) = target.set_attrs(path, attrs) {
                report.failed.push(Failure::new(path, &e));
            }
        }

        report.refused.sort_by(|a, b| a.path.cmp(&b.path));
        report.duration = started.elapsed();
        Ok(report)
    }

    /// Removes target entries the source does not have, if the safety rules allow it this
    /// run; returns the paths removed.
    fn delete_extras(
        &self,
        source: &SourceListing,
        listed: &std::collections::BTreeMap<String, EntryMeta>,
        report: &mut SyncReport,
        touched: &mut BTreeSet<String>,
    ) -> BTreeSet<String> {
        let extras: Vec<&String> = listed
            .iter()
            .filter(|(path, meta)| {
                !path.is_empty()
                    && !within(&source.kept, path)
                    && match source.entries.get(path.as_str()) {
                        None => true,
                        Some(SourceEntry::Dir(_)) => false,
                        // A directory where the source has a file or link goes, with its
                        // contents.
                        Some(_) => meta.is_dir(),
                    }
            })
            .map(|(path, _)| path)
            .collect();
        let mut deleted = BTreeSet::new();
        if extras.is_empty() {
            return deleted;
        }
        let pending = extras.len() as u64;
        let refusal = if !self.config.delete {
            Some(DeletionRefusal::Disabled)
        } else if !source.errors.is_empty() {
            Some(DeletionRefusal::SourceIncomplete {
                errors: source.errors.len() as u64,
            })
        } else if source.entries.is_empty() && !self.config.allow_empty_source {
            Some(DeletionRefusal::EmptySource)
        } else if pending > self.config.max_deletions {
            Some(DeletionRefusal::OverCap {
                max: self.config.max_deletions,
            })
        } else {
            None
        };
        if let Some(reason) = refusal {
            tracing::warn!(
                pending,
                ?reason,
                "deletions on the target refused for this run"
            );
            report.deletions_refused = Some(DeletionsRefused { pending, reason });
            return deleted;
        }
        // Children before their directory: reverse sorted order.
        for path in extras.into_iter().rev() {
            touched.insert(target::parent(path).to_owned());
            match self.target.remove(path) {
                Ok(()) => {
                    tracing::debug!(path, "deleted from the target");
                    report.deleted += 1;
                    deleted.insert(path.clone());
                }
                Err(e) => {
                    tracing::warn!(path, error = %e, "could not delete from the target");
                    report.failed.push(Failure::new(path, &e));
                }
            }
        }
        deleted
    }

    /// Runs `f` on every item, on the calling thread and up to `parallelism - 1` more, and
    /// returns the results in the items' order.
    fn parallel<T: Sync, R: Send>(&self, items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
        let next = AtomicUsize::new(0);
        let span = tracing::Span::current();
        let worker = || {
            let _entered = span.enter();
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                done.push((i, f(item)));
            }
            done
        };
        let helpers = self.config.parallelism.min(items.len()).saturating_sub(1);
        let mut slots: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..helpers)
                .filter_map(|n| {
                    std::thread::Builder::new()
                        .name(format!("ha-file-sync-{n}"))
                        .spawn_scoped(scope, worker)
                        // Without the thread, the calling thread does its share.
                        .ok()
                })
                .collect();
            for (i, result) in worker() {
                slots[i] = Some(result);
            }
            for handle in handles {
                match handle.join() {
                    Ok(done) => {
                        for (i, result) in done {
                            slots[i] = Some(result);
                        }
                    }
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        });
        slots.into_iter().flatten().collect()
    }

    fn sync_link(
        &self,
        path: &str,
        text: &str,
        current: Option<&EntryMeta>,
    ) -> Result<Outcome, FileSyncError> {
        let entry = ManifestEntry::Symlink {
            target: text.to_owned(),
        };
        if matches!(current, Some(EntryMeta::Symlink { target }) if target == text) {
            return Ok(Outcome::Unchanged(entry));
        }
        self.target.symlink(path, text)?;
        Ok(Outcome::Linked(entry))
    }

    fn sync_file(
        &self,
        path: &str,
        file: &SourceFile,
        current: Option<&EntryMeta>,
        recorded: Option<&ManifestEntry>,
        manifest: &Manifest,
        hashed: &AtomicU64,
    ) -> Result<Outcome, FileSyncError> {
        let attrs = file.attrs();
        let entry = |sha256| ManifestEntry::File {
            size: file.size,
            mtime: file.mtime,
            mode: file.mode,
            sha256,
        };
        let on_target = match current {
            Some(&EntryMeta::File { size, mtime, mode }) => Some((size, mtime, mode)),
            _ => None,
        };
        // The recorded hash describes the target file only while it keeps the size and mtime
        // it was written with.
        let trusted = match (recorded, current) {
            (Some(record @ ManifestEntry::File { sha256, .. }), Some(meta))
                if record.same_stat(meta) =>
            {
                Some(*sha256)
            }
            _ => None,
        };
        if let (Some((size, mtime, mode)), Some(sha256)) = (on_target, trusted)
            && !self.config.checksum
            && size == file.size
            && mtime == file.mtime
            && !manifest.is_racy(mtime)
        {
            // Fast path: same size and mtime on both sides as recorded, and that mtime older
            // than the run that recorded it; nothing is read.
            if mode == file.mode {
                return Ok(Outcome::Unchanged(entry(sha256)));
            }
            self.target.set_attrs(path, attrs)?;
            return Ok(Outcome::Metadata(entry(sha256)));
        }
        if let Some((size, mtime, mode)) = on_target
            && size == file.size
        {
            // Same size: the content may well be the same (a touched file, a target synced by
            // other means); hashing beats rewriting.
            let source_sha = self.hash_source(path, file)?;
            hashed.fetch_add(file.size, Ordering::Relaxed);
            let target_sha = match trusted {
                Some(sha256) if !self.config.checksum => sha256,
                _ => {
                    let sha256 = self.target.hash_file(path)?;
                    hashed.fetch_add(size, Ordering::Relaxed);
                    sha256
                }
            };
            if source_sha == target_sha {
                if mtime == file.mtime && mode == file.mode {
                    return Ok(Outcome::Unchanged(entry(source_sha)));
                }
                self.target.set_attrs(path, attrs)?;
                return Ok(Outcome::Metadata(entry(source_sha)));
            }
        }
        let (sha256, bytes) = self.copy(path, file)?;
        tracing::debug!(path, bytes, "copied");
        Ok(Outcome::Copied {
            entry: entry(sha256),
            bytes,
        })
    }

    /// Opens a source file without following a link and checks it is still the file the
    /// listing saw.
    fn open_source(&self, path: &str, file: &SourceFile) -> Result<File, FileSyncError> {
        let abs = self.source.join(path);
        let changed = || FileSyncError::SourceChanged {
            path: path.to_owned(),
        };
        // O_NONBLOCK: a fifo swapped in since the listing must not hang the open.
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
            .open(&abs);
        let handle = match opened {
            Ok(handle) => handle,
            // Gone, or a link now (ELOOP): not the file that was listed.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) =>
            {
                return Err(changed());
            }
            Err(e) => return Err(FileSyncError::io("open source file", abs, e)),
        };
        let metadata = handle
            .metadata()
            .map_err(|e| FileSyncError::io("stat source file", &abs, e))?;
        if !metadata.is_file() || metadata.dev() != file.dev || metadata.ino() != file.ino {
            return Err(changed());
        }
        Ok(handle)
    }

    /// The SHA-256 of a source file, which must be as listed from start to end.
    fn hash_source(&self, path: &str, file: &SourceFile) -> Result<Sha256, FileSyncError> {
        let mut reader = SourceReader::new(self.open_source(path, file)?, path, &self.source, file);
        digest::with_buffer(self.config.buffer_size, |buffer| {
            loop {
                match reader.read(buffer) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Err(reader
                            .error
                            .take()
                            .unwrap_or_else(|| FileSyncError::io("read source file", path, e)));
                    }
                }
            }
        })?;
        reader
            .finish()
            .map(|(sha256, _)| sha256)
            .ok_or_else(|| FileSyncError::SourceChanged {
                path: path.to_owned(),
            })
    }

    /// Copies a source file to the target, then re-hashes the target's copy.
    fn copy(&self, path: &str, file: &SourceFile) -> Result<(Sha256, u64), FileSyncError> {
        let mut reader = SourceReader::new(self.open_source(path, file)?, path, &self.source, file);
        let written = self.target.write_file(path, &mut reader, file.attrs());
        // The source's own error says more than the target's report of a failed read.
        if let Some(e) = reader.error.take() {
            return Err(e);
        }
        written?;
        let (sha256, bytes) = reader.finish().ok_or_else(|| FileSyncError::Target {
            target: self.target.describe(),
            op: "write file",
            path: path.to_owned(),
            source: "stopped reading before the end of the data".into(),
            retryable: true,
        })?;
        let actual = self.target.hash_file(path)?;
        if actual != sha256 {
            return Err(FileSyncError::CopyMismatch {
                path: path.to_owned(),
                expected: sha256,
                actual,
            });
        }
        Ok((sha256, bytes))
    }

    fn verify(&self) -> Result<VerifyReport, FileSyncError> {
        let span = tracing::info_span!("file_verify", sync = %self.config.name,
            target = %self.target.describe());
        let _entered = span.enter();
        let started = Instant::now();
        let _lock = self.target.lock()?;
        let listed = self.target.list()?;
        let mut report = VerifyReport::default();
        let loaded = self.load_manifest()?;
        report.manifest_problem = match (loaded.found, &loaded.discarded) {
            (false, _) => Some("the target has no manifest (never synced)".into()),
            (true, Some(reason)) => Some(format!("unreadable manifest: {reason}")),
            (true, None) => None,
        };
        let manifest = loaded.manifest;
        report.checked = manifest.entries.len() as u64;
        report.extra = listed
            .keys()
            .filter(|path| !path.is_empty() && !manifest.entries.contains_key(path.as_str()))
            .cloned()
            .collect();

        // Kind, size, link and mode checks need no reading; files of the recorded size are
        // hashed on the worker threads.
        let mut found: Vec<(String, Option<Mismatch>)> = Vec::new();
        let mut to_hash: Vec<(&str, Sha256, u64)> = Vec::new();
        for (path, record) in &manifest.entries {
            let Some(meta) = listed.get(path) else {
                report.missing.push(path.clone());
                continue;
            };
            let mismatch = match (record, meta) {
                (
                    ManifestEntry::File {
                        size, sha256, mode, ..
                    },
                    EntryMeta::File {
                        size: actual,
                        mode: actual_mode,
                        ..
                    },
                ) => {
                    if size != actual {
                        Some(Mismatch::Size {
                            expected: *size,
                            actual: *actual,
                        })
                    } else {
                        to_hash.push((path, *sha256, *size));
                        mode_mismatch(*mode, *actual_mode)
                    }
                }
                (ManifestEntry::Dir { mode, .. }, EntryMeta::Dir { mode: actual, .. }) => {
                    mode_mismatch(*mode, *actual)
                }
                (ManifestEntry::Symlink { target }, EntryMeta::Symlink { target: actual }) => {
                    (target != actual).then(|| Mismatch::LinkTarget {
                        expected: target.clone(),
                        actual: actual.clone(),
                    })
                }
                (record, meta) => Some(Mismatch::Kind {
                    expected: record.kind().into(),
                    actual: meta.kind().into(),
                }),
            };
            found.push((path.clone(), mismatch));
        }
        let hashed = self.parallel(&to_hash, |&(path, _, _)| self.target.hash_file(path));
        let mut content = std::collections::BTreeMap::new();
        for (&(path, expected, size), result) in to_hash.iter().zip(hashed) {
            match result {
                Ok(actual) => {
                    report.bytes_hashed += size;
                    if actual != expected {
                        content.insert(path, Mismatch::Content { expected, actual });
                    }
                }
                Err(e) => report.failed.push(Failure::new(path, &e)),
            }
        }
        for (path, mismatch) in found {
            // Content outranks mode: a rewritten file is what matters.
            if let Some(mismatch) = content.remove(path.as_str()).or(mismatch) {
                report.modified.push(Modified { path, mismatch });
            }
        }
        report.duration = started.elapsed();
        metrics::gauge!(metric::REPLICATION_FILE_VERIFY_PROBLEMS, "sync" => self.config.name.clone())
            .set(report.problems() as f64);
        if report.is_clean() {
            tracing::info!(
                checked = report.checked,
                bytes = report.bytes_hashed,
                "target verified clean"
            );
        } else {
            tracing::warn!(
                missing = report.missing.len(),
                modified = report.modified.len(),
                extra = report.extra.len(),
                failed = report.failed.len(),
                manifest = ?report.manifest_problem,
                "target differs from its manifest"
            );
        }
        Ok(report)
    }
}

fn mode_mismatch(expected: u32, actual: u32) -> Option<Mismatch> {
    (expected != actual).then_some(Mismatch::Mode { expected, actual })
}

/// Reads a source file for hashing or copying, hashing what it hands out, and fails (before
/// the end of the stream, so the target never commits it) if the file turns out not to be the
/// one listed: another size at the end, or another mtime.
struct SourceReader<'a> {
    file: File,
    path: &'a str,
    root: &'a Path,
    expected: &'a SourceFile,
    hasher: Option<Hasher>,
    at_end: bool,
    /// The first error, kept so the caller can report it rather than the target's wrapping.
    error: Option<FileSyncError>,
}

impl<'a> SourceReader<'a> {
    fn new(file: File, path: &'a str, root: &'a Path, expected: &'a SourceFile) -> Self {
        Self {
            file,
            path,
            root,
            expected,
            hasher: Some(Hasher::new()),
            at_end: false,
            error: None,
        }
    }

    fn fail(&mut self, error: FileSyncError) -> io::Error {
        let text = error.to_string();
        self.error.get_or_insert(error);
        io::Error::other(text)
    }

    fn changed(&mut self) -> io::Error {
        self.fail(FileSyncError::SourceChanged {
            path: self.path.to_owned(),
        })
    }

    /// The digest and length of everything read, if the whole file was.
    fn finish(mut self) -> Option<(Sha256, u64)> {
        let hasher = self.hasher.take().filter(|_| self.at_end)?;
        let len = hasher.len();
        Some((hasher.finish(), len))
    }
}

impl Read for SourceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.error.is_some() {
            return Err(io::Error::other("source read already failed"));
        }
        if self.at_end || buf.is_empty() {
            return Ok(0);
        }
        let n = match self.file.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                let abs = self.root.join(self.path);
                return Err(self.fail(FileSyncError::io("read source file", abs, e)));
            }
        };
        let len = self.hasher.as_ref().map_or(0, Hasher::len) + n as u64;
        if len > self.expected.size {
            return Err(self.changed());
        }
        if n == 0 {
            let now = self.file.metadata().map(|m| (m.len(), Mtime::of(&m)));
            if len != self.expected.size
                || now.ok() != Some((self.expected.size, self.expected.mtime))
            {
                return Err(self.changed());
            }
            self.at_end = true;
            return Ok(0);
        }
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buf[..n]);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inner(target: &Path, config: FileSyncConfig) -> Inner {
        Inner {
            source: PathBuf::from("/unused"),
            target: Arc::new(LocalTarget::new(target)),
            config,
        }
    }

    #[test]
    fn an_incomplete_source_listing_refuses_every_deletion() {
        // (Unreadable directories cannot be staged when the tests run as root, so the listing
        // is made up here.)
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("extra"), b"x").unwrap();
        let inner = inner(dir.path(), FileSyncConfig::default());
        let listed = inner.target.list().unwrap();
        let mut source = SourceListing::default();
        source
            .entries
            .insert("kept".into(), SourceEntry::Symlink("elsewhere".into()));
        source.errors.push(Failure::new(
            "unreadable",
            &FileSyncError::io(
                "list directory",
                "/src/unreadable",
                io::ErrorKind::PermissionDenied.into(),
            ),
        ));
        let mut report = SyncReport::default();
        let deleted = inner.delete_extras(&source, &listed, &mut report, &mut BTreeSet::new());
        assert!(deleted.is_empty());
        assert_eq!(
            report.deletions_refused,
            Some(DeletionsRefused {
                pending: 1,
                reason: DeletionRefusal::SourceIncomplete { errors: 1 },
            })
        );
        assert!(dir.path().join("extra").exists());

        // The same listing without the error deletes.
        source.errors.clear();
        let mut report = SyncReport::default();
        let deleted = inner.delete_extras(&source, &listed, &mut report, &mut BTreeSet::new());
        assert_eq!(deleted.len(), 1);
        assert_eq!(report.deleted, 1);
        assert!(!dir.path().join("extra").exists());
    }

    #[test]
    fn paths_within_a_set_include_descendants_only() {
        let set: BTreeSet<String> = ["a/b".to_owned()].into();
        assert!(within(&set, "a/b"));
        assert!(within(&set, "a/b/c"));
        assert!(!within(&set, "a"));
        assert!(!within(&set, "a/bc"));
        assert!(within(&[String::new()].into(), "x"));
    }
}
