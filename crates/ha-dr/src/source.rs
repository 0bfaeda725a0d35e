//! What can be backed up ([`Source`]) and how each kind is written into a backup stream and
//! read back out of one.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, from_io};
use crate::manifest::{BackupKind, Details, Skipped};
use crate::pg::PgTools;
use crate::pipeline::{copy_large, fill};

/// Something to back up.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Source {
    /// A directory tree, as a tar stream: regular files, directories and symlinks (stored as
    /// links, never followed), with permissions and mtimes. FIFOs, sockets and device nodes
    /// are skipped and listed in the manifest, as is the store's own directory.
    Dir(PathBuf),
    /// One file's bytes (a regular file, or a pipe such as `/dev/stdin`).
    File(PathBuf),
    /// A config value, serialised to JSON, with the environment variables named in an
    /// allow-list (never a deny-list: nothing is captured unless named).
    Config(ConfigSnapshot),
    /// A PostgreSQL database, dumped by `pg_dump -Fc -Z0` in one snapshot.
    Postgres {
        /// The database URL (`postgresql://user@host:port/database`).
        url: String,
        /// Where `pg_dump` is.
        tools: PgTools,
    },
    /// A whole PostgreSQL cluster, by `pg_basebackup` (tar to stdout, no WAL): a base backup
    /// for point-in-time recovery with the WAL archived by `ha-dr wal-push`.
    PgBase {
        /// A URL of a role with the `REPLICATION` attribute.
        url: String,
        /// Where `pg_basebackup` is.
        tools: PgTools,
    },
}

impl Source {
    /// A directory tree.
    pub fn dir(path: impl Into<PathBuf>) -> Self {
        Source::Dir(path.into())
    }

    /// One file.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Source::File(path.into())
    }

    /// A PostgreSQL database, with `pg_dump` found on `PATH` or in `tools`.
    pub fn postgres(url: impl Into<String>, tools: PgTools) -> Self {
        Source::Postgres {
            url: url.into(),
            tools,
        }
    }

    /// A whole PostgreSQL cluster, with `pg_basebackup` found on `PATH` or in `tools`.
    pub fn pg_base(url: impl Into<String>, tools: PgTools) -> Self {
        Source::PgBase {
            url: url.into(),
            tools,
        }
    }

    /// A config value named `name`, and the current values of the environment variables in
    /// `env_allow` (unset ones are left out).
    pub fn config<T: Serialize>(name: &str, value: &T, env_allow: &[&str]) -> Result<Self> {
        Ok(Source::Config(ConfigSnapshot::capture(
            name, value, env_allow,
        )?))
    }

    /// The kind of backup this source makes.
    pub fn kind(&self) -> BackupKind {
        match self {
            Source::Dir(_) => BackupKind::Dir,
            Source::File(_) => BackupKind::File,
            Source::Config(_) => BackupKind::Config,
            Source::Postgres { .. } => BackupKind::Postgres,
            Source::PgBase { .. } => BackupKind::PgBase,
        }
    }

    /// A description for the manifest (paths as given; URLs without password).
    pub fn describe(&self) -> String {
        match self {
            Source::Dir(p) | Source::File(p) => p.display().to_string(),
            Source::Config(c) => format!("config:{}", c.name),
            Source::Postgres { url, .. } | Source::PgBase { url, .. } => crate::pg::redact(url),
        }
    }
}

/// A config value and an allow-listed environment snapshot, as stored in a config backup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigSnapshot {
    /// The config's name.
    pub name: String,
    /// The value, as JSON.
    pub value: serde_json::Value,
    /// The allow-listed environment variables that were set, by name.
    pub env: std::collections::BTreeMap<String, String>,
}

impl ConfigSnapshot {
    /// Captures `value` and the allow-listed environment.
    pub fn capture<T: Serialize>(name: &str, value: &T, env_allow: &[&str]) -> Result<Self> {
        let value = serde_json::to_value(value).map_err(|e| Error::Manifest {
            backup_id: format!("config:{name}"),
            detail: format!("config value does not serialise: {e}"),
        })?;
        let env = env_allow
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
            .collect();
        Ok(Self {
            name: name.to_owned(),
            value,
            env,
        })
    }
}

/// Writes a directory tree into `out` as tar; returns the entry count and what was skipped
/// or changed while it was read. `exclude` (the store's own directory, when it lies inside
/// the tree) is left out.
///
/// Every header is written from one `stat` of the open file and exactly that many bytes
/// follow it, as GNU tar does: a file that grows is cut, one that shrinks is padded with
/// zeros, and both are recorded as changed while read. Only entry types that a restore
/// accepts are written (regular files, directories, symlinks; never sparse entries);
/// FIFOs, sockets and device nodes are skipped and recorded.
pub(crate) fn write_dir(
    root: &Path,
    exclude: Option<&Path>,
    out: &mut dyn Write,
) -> Result<Details> {
    write_dir_observed(root, exclude, out, &mut |_| {})
}

/// [`write_dir`], calling `before_read` with each regular file's path between its `stat`
/// and the copy of its bytes (tests change files there).
pub(crate) fn write_dir_observed(
    root: &Path,
    exclude: Option<&Path>,
    out: &mut dyn Write,
    before_read: &mut dyn FnMut(&Path),
) -> Result<Details> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(root).map_err(|e| Error::io("stat", root, e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            "back up directory",
            root,
            io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let excluded = match exclude.map(fs::metadata) {
        Some(Ok(m)) => Some((m.dev(), m.ino())),
        _ => None,
    };
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    builder.sparse(false);
    builder.mode(tar::HeaderMode::Complete);
    let mut entries = 0u64;
    let mut changed = Vec::new();
    let mut skipped = Vec::new();
    // The root itself, so its mode and mtime come back too.
    append_dir_entry(&mut builder, Path::new("."), &meta).map_err(|e| tar_err(e, root))?;
    entries += 1;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(|e| Error::io("list", &dir, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .map_err(|e| Error::io("list", &dir, e))?;
        names.sort();
        for name in names {
            let rel_path = rel.join(&name);
            let path = root.join(&rel_path);
            let shown = rel_path.display().to_string();
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                // Deleted since the listing: as if it had never been there.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    changed.push(shown);
                    continue;
                }
                Err(e) => return Err(Error::io("stat", &path, e)),
            };
            let file_type = meta.file_type();
            if file_type.is_dir() {
                if excluded == Some((meta.dev(), meta.ino())) {
                    skipped.push(Skipped::new(&shown, "the backup store itself"));
                    continue;
                }
                append_dir_entry(&mut builder, &rel_path, &meta).map_err(|e| tar_err(e, &path))?;
                stack.push(rel_path);
            } else if file_type.is_symlink() {
                let target = fs::read_link(&path).map_err(|e| Error::io("read link", &path, e))?;
                let mut header = tar::Header::new_gnu();
                header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
                header.set_size(0);
                builder
                    .append_link(&mut header, &rel_path, &target)
                    .map_err(|e| tar_err(e, &path))?;
            } else if file_type.is_file() {
                match append_file_entry(&mut builder, &path, &rel_path, &meta, before_read)? {
                    FileOutcome::Whole => {}
                    FileOutcome::Changed => changed.push(shown),
                    FileOutcome::Skipped(reason) => {
                        skipped.push(Skipped::new(&shown, reason));
                        continue;
                    }
                }
            } else {
                let reason = special_kind(&file_type);
                tracing::warn!(path = %path.display(), kind = reason, "special file skipped");
                skipped.push(Skipped::new(&shown, reason));
                continue;
            }
            entries += 1;
        }
    }
    builder.finish().map_err(|e| tar_err(e, root))?;
    for path in &changed {
        tracing::warn!(root = %root.display(), path, "file changed while it was read");
    }
    Ok(Details::Dir {
        entries,
        changed,
        skipped,
    })
}

fn special_kind(file_type: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_fifo() {
        "a FIFO (not backed up)"
    } else if file_type.is_socket() {
        "a socket (not backed up)"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "a device node (not backed up)"
    } else {
        "an unknown file type (not backed up)"
    }
}

fn append_dir_entry(
    builder: &mut tar::Builder<&mut dyn Write>,
    rel: &Path,
    meta: &fs::Metadata,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    header.set_entry_type(tar::EntryType::Directory);
    header.set_size(0);
    builder.append_data(&mut header, rel, io::empty())
}

enum FileOutcome {
    Whole,
    Changed,
    Skipped(&'static str),
}

fn append_file_entry(
    builder: &mut tar::Builder<&mut dyn Write>,
    path: &Path,
    rel: &Path,
    listed: &fs::Metadata,
    before_read: &mut dyn FnMut(&Path),
) -> Result<FileOutcome> {
    use nix::fcntl::OFlag;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // Never follow a link swapped in since the listing, never block on a FIFO.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(FileOutcome::Skipped("deleted while read"));
        }
        Err(e) => return Err(Error::io("open", path, e)),
    };
    let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    if !meta.is_file() || (meta.dev(), meta.ino()) != (listed.dev(), listed.ino()) {
        return Ok(FileOutcome::Skipped("replaced while read"));
    }
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(meta.len());
    before_read(path);
    let mut exact = Exact {
        inner: &mut file,
        left: meta.len(),
        short: false,
    };
    builder
        .append_data(&mut header, rel, &mut exact)
        .map_err(|e| tar_err(e, path))?;
    let short = exact.short;
    let mut probe = [0u8; 1];
    let grew = loop {
        match file.read(&mut probe) {
            Ok(n) => break n > 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", path, e)),
        }
    };
    let after = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    let touched = after.len() != meta.len()
        || (after.mtime(), after.mtime_nsec()) != (meta.mtime(), meta.mtime_nsec());
    Ok(if short || grew || touched {
        FileOutcome::Changed
    } else {
        FileOutcome::Whole
    })
}

/// Exactly `left` bytes of `inner`: cut if it has more, padded with zeros (and `short` set)
/// if it has fewer.
struct Exact<R> {
    inner: R,
    left: u64,
    short: bool,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = if self.short {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        let n = if n == 0 {
            self.short = true;
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.left -= n as u64;
        Ok(n)
    }
}

fn tar_err(e: io::Error, path: &Path) -> Error {
    let path = path.to_owned();
    match from_io(e, String::new) {
        Error::Stream { source, .. } => Error::io("archive", path, source),
        other => other,
    }
}

/// Writes one file's bytes into `out`.
pub(crate) fn write_file(path: &Path, out: &mut dyn Write) -> Result<Details> {
    use std::os::unix::fs::PermissionsExt;
    let mut file = fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    // Anything readable but a directory: regular files, and pipes such as `/dev/stdin`.
    if meta.is_dir() {
        return Err(Error::io(
            "back up file",
            path,
            io::Error::new(
                io::ErrorKind::IsADirectory,
                "a directory (use a dir source)",
            ),
        ));
    }
    copy_large(&mut file, out).map_err(|e| match from_io(e, String::new) {
        Error::Stream { source, .. } => Error::io("read", path, source),
        other => other,
    })?;
    Ok(if meta.is_file() {
        Details::File {
            mode: meta.permissions().mode() & 0o777,
        }
    } else {
        Details::None
    })
}

/// Writes a config snapshot into `out` as JSON.
pub(crate) fn write_config(config: &ConfigSnapshot, out: &mut dyn Write) -> Result<Details> {
    serde_json::to_writer_pretty(&mut *out, config).map_err(|e| {
        if e.is_io() {
            from_io(e.into(), || format!("write config {}", config.name))
        } else {
            Error::Manifest {
                backup_id: format!("config:{}", config.name),
                detail: e.to_string(),
            }
        }
    })?;
    Ok(Details::Config {
        env: config.env.keys().cloned().collect(),
    })
}

/// Extracts the tar stream `input` into the (new, empty) directory `dest`, refusing any entry
/// that would land outside it. Returns the number of entries. `flush` is handed each regular
/// file being written every [`FLUSH_EVERY`] bytes and once complete, so that the caller can
/// start writing it back to disk while extraction goes on (see [`with_flusher`]).
pub(crate) fn extract_dir(
    backup_id: &str,
    input: &mut dyn Read,
    dest: &Path,
    flush: &mut dyn FnMut(&fs::File),
) -> Result<u64> {
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(false);
    archive.set_unpack_xattrs(false);
    // Ownership is never restored, so setuid/setgid bits would come back on files owned by
    // whoever restores (a user's 4755 file a root setuid binary on a root restore).
    archive.set_preserve_ownerships(false);
    archive.set_mask(SETID_BITS);
    let unsafe_entry = |entry: &str, reason: &str| unsafe_entry(backup_id, entry, reason);
    let read_err = |e: io::Error| tar_read_err(backup_id, e);
    // Every file's parent is checked against this (canonical once, not per file).
    let canonical = dest
        .canonicalize()
        .map_err(|e| Error::io("resolve", dest, e))?;
    let mut count = 0u64;
    // Directories last (as `tar::Archive::unpack` does), so that their modes (a read-only
    // directory) and mtimes are set after their contents are written.
    let mut directories = Vec::new();
    let mut root = None;
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let path = entry.path().map_err(read_err)?.into_owned();
        let shown = path.display().to_string();
        let kind = entry.header().entry_type();
        check_entry(backup_id, &entry, &path)?;
        count += 1;
        if kind.is_dir() && path.components().all(|c| c == Component::CurDir) {
            // The root: `unpack_in` skips it; its mode and mtime go onto `dest` at the end.
            let header = entry.header();
            root = Some((
                header.mode().map_err(read_err)?,
                header.mtime().map_err(read_err)?,
            ));
            continue;
        }
        if kind.is_dir() {
            directories.push(entry);
            continue;
        }
        if kind.is_file() || kind == tar::EntryType::Continuous {
            unpack_file(backup_id, &mut entry, (dest, &canonical), &path, flush)?;
            continue;
        }
        let unpacked = entry.unpack_in(dest).map_err(|e| {
            let text = e.to_string();
            if text.contains("outside of") {
                unsafe_entry(&shown, "would be written through a link outside the target")
            } else {
                from_io(e, || format!("restore {shown} from backup {backup_id}"))
            }
        })?;
        if !unpacked {
            return Err(unsafe_entry(&shown, "escapes the target"));
        }
    }
    directories.reverse();
    for mut dir in directories {
        let path = dir.path().map_err(read_err)?.into_owned();
        let shown = path.display().to_string();
        dir.unpack_in(dest)
            .map_err(|e| from_io(e, || format!("restore {shown} from backup {backup_id}")))?;
        // `tar` sets a directory's mode but not its mtime.
        let mtime = dir.header().mtime().map_err(read_err)?;
        let full = dest.join(&path);
        fs::File::open(&full)
            .and_then(|d| {
                d.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime))
            })
            .map_err(|e| Error::io("set mtime of", &full, e))?;
    }
    if let Some((mode, mtime)) = root {
        use std::os::unix::fs::PermissionsExt;
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
        fs::File::open(dest)
            .and_then(|d| d.set_modified(mtime))
            .and_then(|()| {
                fs::set_permissions(
                    dest,
                    fs::Permissions::from_mode(mode & 0o7777 & !SETID_BITS),
                )
            })
            .map_err(|e| Error::io("set mode and mtime of", dest, e))?;
    }
    drain_zeros(backup_id, archive.into_inner())?;
    Ok(count)
}

/// setuid and setgid: masked on restore, as ownership is not restored.
const SETID_BITS: u32 = 0o6000;

/// Bytes of a regular file written between two hand-overs to `extract_dir`'s `flush`.
pub(crate) const FLUSH_EVERY: u64 = 8 << 20;

/// Bytes per read and write of a regular file's data (`tar`'s own unpacking copies in
/// 8 KiB writes: 130,000 system calls for 1 GiB).
const FILE_CHUNK: usize = 1 << 20;

/// Writes the regular file entry `rel` under `dest` (`root`: `dest` canonical) as
/// `tar::Entry::unpack_in` would (the same refusals: no `..`, never through a link that
/// leaves `dest`, never over an existing file), with large writes, handing the file to
/// `flush` as it grows. Mode (setuid/setgid masked) and mtime as recorded.
fn unpack_file<R: Read>(
    backup_id: &str,
    entry: &mut tar::Entry<'_, R>,
    (dest, root): (&Path, &Path),
    rel: &Path,
    flush: &mut dyn FnMut(&fs::File),
) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let shown = rel.display().to_string();
    let escapes = |reason: &str| unsafe_entry(backup_id, &shown, reason);
    let mut target = dest.to_path_buf();
    for part in rel.components() {
        match part {
            Component::Normal(part) => target.push(part),
            Component::CurDir => {}
            _ => return Err(escapes("absolute or `..` path escapes the target")),
        }
    }
    let (Some(parent), Some(name), false) = (target.parent(), target.file_name(), target == dest)
    else {
        return Err(escapes("a file entry without a name"));
    };
    let inside = canonical_inside(root, parent).map_err(|e| match e {
        Some(e) => Error::io("create directory", parent, e),
        None => escapes("would be written through a link outside the target"),
    })?;
    let full = inside.join(name);
    let header = entry.header();
    let mode = header.mode().map_err(|e| tar_read_err(backup_id, e))? & 0o7777 & !SETID_BITS;
    let mtime = header.mtime().map_err(|e| tar_read_err(backup_id, e))?;
    let want = entry.size();
    // Private until complete; `create_new` never follows a link nor replaces a file.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&full)
        .map_err(|e| Error::io("create", &full, e))?;
    let mut buf = vec![0u8; FILE_CHUNK];
    let (mut written, mut flushed) = (0u64, 0u64);
    loop {
        let n = fill(entry, &mut buf)
            .map_err(|e| from_io(e, || format!("restore {shown} from backup {backup_id}")))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])
            .map_err(|e| Error::io("write", &full, e))?;
        written += n as u64;
        if written - flushed >= FLUSH_EVERY {
            flush(&file);
            flushed = written;
        }
    }
    if written != want {
        return Err(Error::corrupt(
            backup_id,
            format!("tar entry {shown} is cut short ({written} of {want} bytes)"),
        ));
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
    file.set_times(fs::FileTimes::new().set_accessed(at).set_modified(at))
        .and_then(|()| file.set_permissions(fs::Permissions::from_mode(mode)))
        .map_err(|e| Error::io("set mode and mtime of", &full, e))?;
    flush(&file);
    Ok(())
}

/// Creates the missing directories of `dir` (under the canonical `root`) and returns `dir`'s
/// canonical path, refusing (`Err(None)`) where a link would take it, or a directory created
/// on the way, outside `root`.
fn canonical_inside(root: &Path, dir: &Path) -> std::result::Result<PathBuf, Option<io::Error>> {
    let mut missing = Vec::new();
    let mut ancestor = dir;
    while ancestor.symlink_metadata().is_err() {
        missing.push(ancestor);
        match ancestor.parent() {
            Some(parent) => ancestor = parent,
            None => break,
        }
    }
    for created in missing.into_iter().rev() {
        if let Some(parent) = created.parent()
            && !parent.canonicalize().map_err(Some)?.starts_with(root)
        {
            return Err(None);
        }
        match fs::create_dir(created) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(Some(e)),
            _ => {}
        }
    }
    let canonical = dir.canonicalize().map_err(Some)?;
    if canonical.starts_with(root) {
        Ok(canonical)
    } else {
        Err(None)
    }
}

/// Writes files back to disk on a thread of its own while a restore extracts: each file
/// [`extract_dir`] hands over is `fdatasync`ed there, so the disk works while this thread
/// decodes and writes, instead of after (a final `sync_tree` is still what guarantees it).
/// A hand-over while the thread is still busy with an earlier one is dropped: that sync
/// covers most of it, and the next (or the final `sync_tree`) the rest.
pub(crate) fn with_flusher<T>(work: impl FnOnce(&mut dyn FnMut(&fs::File)) -> T) -> T {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<fs::File>(1);
        scope.spawn(move || {
            for file in rx {
                let _ = file.sync_data();
            }
        });
        let mut flush = |file: &fs::File| {
            if let Ok(clone) = file.try_clone() {
                let _ = tx.try_send(clone);
            }
        };
        work(&mut flush)
    })
}

fn unsafe_entry(backup_id: &str, entry: &str, reason: &str) -> Error {
    Error::UnsafeEntry {
        backup_id: backup_id.to_owned(),
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    }
}

fn tar_read_err(backup_id: &str, e: io::Error) -> Error {
    from_io(e, || format!("read tar stream of backup {backup_id}"))
}

/// Refuses an entry that a restore would refuse: a path or hard link leaving the target,
/// or a type other than file, directory, symlink or hard link.
pub(crate) fn check_entry<R: Read>(
    backup_id: &str,
    entry: &tar::Entry<'_, R>,
    path: &Path,
) -> Result<()> {
    let shown = path.display().to_string();
    if !is_contained(path) {
        return Err(unsafe_entry(
            backup_id,
            &shown,
            "absolute or `..` path escapes the target",
        ));
    }
    let kind = entry.header().entry_type();
    if kind.is_hard_link() {
        let target = entry.link_name().map_err(|e| tar_read_err(backup_id, e))?;
        if !target.as_deref().is_some_and(is_contained) {
            return Err(unsafe_entry(
                backup_id,
                &shown,
                "hard link to outside the target",
            ));
        }
    }
    if !(kind.is_file()
        || kind.is_dir()
        || kind.is_symlink()
        || kind.is_hard_link()
        || kind == tar::EntryType::Continuous
        || kind.is_pax_global_extensions())
    {
        return Err(unsafe_entry(
            backup_id,
            &shown,
            "entry type not restored (FIFO, device, sparse or unknown)",
        ));
    }
    Ok(())
}

/// What follows the end-of-archive marker must be zeros: anything else was not meant to be
/// there.
pub(crate) fn drain_zeros(backup_id: &str, input: &mut dyn Read) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(tar_read_err(backup_id, e)),
        };
        if buf[..n].iter().any(|&b| b != 0) {
            return Err(Error::corrupt(
                backup_id,
                "data after the end of the tar archive",
            ));
        }
    }
}

/// Walks the tar stream `input` as a restore would, without writing anything: every header,
/// path, entry type and size (each entry's data is read to its end). Returns the number of
/// entries.
pub(crate) fn check_tar(backup_id: &str, input: &mut dyn Read) -> Result<u64> {
    let mut archive = tar::Archive::new(input);
    let mut count = 0u64;
    for entry in archive.entries().map_err(|e| tar_read_err(backup_id, e))? {
        let mut entry = entry.map_err(|e| tar_read_err(backup_id, e))?;
        let path = entry
            .path()
            .map_err(|e| tar_read_err(backup_id, e))?
            .into_owned();
        check_entry(backup_id, &entry, &path)?;
        let want = entry.size();
        let got =
            copy_large(&mut entry, &mut io::sink()).map_err(|e| tar_read_err(backup_id, e))?;
        if got != want {
            return Err(Error::corrupt(
                backup_id,
                format!("tar entry {} is cut short", path.display()),
            ));
        }
        count += 1;
    }
    drain_zeros(backup_id, archive.into_inner())?;
    Ok(count)
}

fn is_contained(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar stream of `entries` (path, type, link target, content), written with raw
    /// header names so that paths `tar::Builder` would refuse can be made.
    type Entry<'a> = (&'a str, tar::EntryType, &'a str, &'a [u8]);

    fn hostile_tar(entries: &[Entry<'_>]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, link, data) in entries {
            let mut header = tar::Header::new_gnu();
            let name = &mut header.as_gnu_mut().expect("gnu header").name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_entry_type(*kind);
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            if !link.is_empty() {
                header.set_link_name(link).expect("link name");
            }
            header.set_cksum();
            builder.append(&header, *data).expect("append");
        }
        builder.into_inner().expect("tar")
    }

    fn extract(tar: &[u8]) -> (Result<u64>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let dest = dir.path().join("dest");
        fs::create_dir(&dest).expect("dest");
        let result = extract_dir("b1", &mut &tar[..], &dest, &mut |_| {});
        (result, dir)
    }

    #[test]
    fn entries_escaping_the_target_are_refused() {
        use tar::EntryType::{Link, Regular, Symlink};
        let cases: Vec<Vec<Entry<'_>>> = vec![
            vec![("../evil", Regular, "", b"x")],
            vec![("a/../../evil", Regular, "", b"x")],
            vec![("/tmp/ha-dr-evil", Regular, "", b"x")],
            vec![("hard", Link, "../../etc/passwd", b"")],
            vec![
                ("link", Symlink, "..", b""),
                ("link/evil", Regular, "", b"x"),
            ],
            // Directories that do not exist yet, behind a link that leaves the target.
            vec![
                ("link", Symlink, "..", b""),
                ("link/evil/deeper/file", Regular, "", b"x"),
            ],
        ];
        for entries in cases {
            let (result, dir) = extract(&hostile_tar(&entries));
            let err = result.expect_err(entries[entries.len() - 1].0);
            assert!(matches!(err, Error::UnsafeEntry { .. }), "{err}");
            assert!(!dir.path().join("evil").exists());
        }
        assert!(!Path::new("/tmp/ha-dr-evil").exists());
    }

    #[test]
    fn a_file_entry_never_writes_through_a_link_of_its_own_name() {
        use tar::EntryType::{Regular, Symlink};
        let (result, dir) = extract(&hostile_tar(&[
            ("evil", Symlink, "../evil", b""),
            ("evil", Regular, "", b"x"),
        ]));
        result.expect_err("a file over a link");
        assert!(!dir.path().join("evil").exists());
    }

    #[test]
    fn a_link_pointing_outside_is_restored_as_a_link_only() {
        use tar::EntryType::{Regular, Symlink};
        let (result, dir) = extract(&hostile_tar(&[
            ("out", Symlink, "/etc", b""),
            ("ok.txt", Regular, "", b"fine"),
        ]));
        assert_eq!(result.expect("extract"), 2);
        let dest = dir.path().join("dest");
        assert_eq!(
            fs::read_link(dest.join("out")).expect("link").to_str(),
            Some("/etc")
        );
        assert_eq!(fs::read(dest.join("ok.txt")).expect("file"), b"fine");
    }

    /// A file that grows (with bytes that look like tar headers) and one that shrinks
    /// between their `stat` and their read: the archive stays whole, every later entry
    /// comes back, nothing is injected, and both are recorded as changed.
    #[test]
    fn files_growing_and_shrinking_during_a_backup_keep_the_archive_whole() {
        let src = tempfile::tempdir().expect("temp dir");
        let root = src.path();
        fs::write(root.join("a-grows"), vec![b'a'; 1000]).expect("write");
        fs::write(root.join("b-shrinks"), vec![b'b'; 5000]).expect("write");
        fs::write(root.join("c-zero-grows"), vec![b'c'; 100]).expect("write");
        fs::write(root.join("d-after"), b"still here").expect("write");
        fs::write(root.join("e-after"), b"me too").expect("write");
        let injected = hostile_tar(&[("evil", tar::EntryType::Regular, "", b"pwned")]);
        let mut tar = Vec::new();
        let details = write_dir_observed(root, None, &mut tar, &mut |path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let grow = |bytes: &[u8]| {
                fs::OpenOptions::new()
                    .append(true)
                    .open(path)
                    .and_then(|mut f| f.write_all(bytes))
                    .expect("grow");
            };
            match name {
                "a-grows" => grow(&injected),
                "b-shrinks" => fs::File::options()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(10))
                    .expect("shrink"),
                "c-zero-grows" => grow(&[0u8; 4096]),
                _ => {}
            }
        })
        .expect("backup");
        let Details::Dir {
            entries, changed, ..
        } = details
        else {
            panic!("not dir details: {details:?}");
        };
        assert_eq!(entries, 6);
        assert_eq!(changed, ["a-grows", "b-shrinks", "c-zero-grows"]);
        assert_eq!(check_tar("b1", &mut &tar[..]).expect("structure"), 6);
        let (result, dir) = extract(&tar);
        assert_eq!(result.expect("extract"), 6);
        let dest = dir.path().join("dest");
        assert_eq!(fs::read(dest.join("a-grows")).expect("a"), vec![b'a'; 1000]);
        let mut shrunk = vec![b'b'; 10];
        shrunk.resize(5000, 0);
        assert_eq!(fs::read(dest.join("b-shrinks")).expect("b"), shrunk);
        assert_eq!(
            fs::read(dest.join("c-zero-grows")).expect("c"),
            vec![b'c'; 100]
        );
        assert_eq!(fs::read(dest.join("d-after")).expect("d"), b"still here");
        assert_eq!(fs::read(dest.join("e-after")).expect("e"), b"me too");
        assert!(!dest.join("evil").exists());
    }

    #[test]
    fn trailing_data_and_refused_types_fail_the_structure_check() {
        let mut tar = hostile_tar(&[("ok", tar::EntryType::Regular, "", b"x")]);
        assert_eq!(check_tar("b1", &mut &tar[..]).expect("fine"), 1);
        tar.extend_from_slice(&[0u8; 1024]);
        tar.extend_from_slice(b"junk");
        let err = check_tar("b1", &mut &tar[..]).expect_err("junk");
        assert!(err.to_string().contains("after the end"), "{err}");
        for kind in [
            tar::EntryType::Fifo,
            tar::EntryType::Char,
            tar::EntryType::Block,
        ] {
            let tar = hostile_tar(&[("odd", kind, "", b"")]);
            let err = check_tar("b1", &mut &tar[..]).expect_err("refused type");
            assert!(matches!(err, Error::UnsafeEntry { .. }), "{err}");
        }
        let sparse = hostile_tar(&[("odd", tar::EntryType::GNUSparse, "", b"")]);
        assert!(check_tar("b1", &mut &sparse[..]).is_err());
    }
}
