//! [`BackupStore`]: where backups live, and [`LocalStore`], a directory on a local file system.
//!
//! The trait is synchronous on purpose: the pipeline that feeds it is CPU-bound streaming
//! (zstd, AES-GCM, SHA-256) that runs on a blocking thread (`tokio::task::spawn_blocking`,
//! which [`Repository`](crate::Repository) does for you), and `std::io::Write`/`Read` are
//! what zstd, tar and child processes speak. A store on a network service can still implement
//! it by blocking on its client inside those threads.

use std::fmt::Debug;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::format::BackupId;
use crate::key::random_array;

/// Storage for backups: one data blob and one manifest per backup id.
///
/// To ensure correctness, an implementation must:
/// - make a backup visible (to [`list`](Self::list) and [`get_manifest`](Self::get_manifest))
///   only through [`put_manifest`](Self::put_manifest), atomically: a reader sees the whole
///   manifest or none, never a prefix;
/// - make committed data durable before `commit` returns, and the manifest durable before
///   `put_manifest` returns (for a file system: temp name, fsync file, rename, fsync directory);
/// - leave nothing visible when a [`DataWriter`] is dropped without `commit`, or when the
///   process dies at any point before `put_manifest` returns;
/// - in [`delete`](Self::delete), remove the manifest before the data, so that a crash
///   half-way leaves an invisible blob, never a manifest without data;
/// - return [`Error::NotFound`] for ids without a manifest.
pub trait BackupStore: Send + Sync + Debug + 'static {
    /// A short description for logs and errors, e.g. `local:/var/backups`.
    fn describe(&self) -> String;

    /// Starts writing the data of backup `id`. Nothing is visible until
    /// [`DataWriter::commit`] and then [`put_manifest`](Self::put_manifest).
    fn create_data(&self, id: &BackupId) -> Result<Box<dyn DataWriter>>;

    /// Reads the committed data of backup `id`.
    fn open_data(&self, id: &BackupId) -> Result<Box<dyn Read + Send>>;

    /// Stores the manifest of backup `id`, which makes the backup exist. Call only after the
    /// data is committed.
    fn put_manifest(&self, id: &BackupId, manifest: &[u8]) -> Result<()>;

    /// The stored manifest bytes of backup `id`.
    fn get_manifest(&self, id: &BackupId) -> Result<Vec<u8>>;

    /// The ids of every backup that has a manifest, sorted.
    fn list(&self) -> Result<Vec<BackupId>>;

    /// Removes backup `id`: manifest first, then data.
    fn delete(&self, id: &BackupId) -> Result<()>;

    /// Removes leftovers older than `older_than`: unfinished writes and data whose manifest
    /// was never written (a crash between the two). Returns what was removed. Leftovers
    /// younger than that may belong to a backup still running and are kept.
    fn cleanup(&self, older_than: Duration) -> Result<Vec<String>>;

    /// The local directory the store writes into, if it has one: a directory backup of a
    /// tree that contains it leaves it out (it would otherwise read its own output).
    fn local_dir(&self) -> Option<&Path> {
        None
    }
}

/// The data of one backup being written. Dropping it without [`commit`](Self::commit)
/// discards what was written.
pub trait DataWriter: Write + Send {
    /// Makes the data durable under its final name (still invisible until the manifest).
    fn commit(self: Box<Self>) -> Result<()>;
}

/// A store in a local directory.
///
/// Layout: `<id>.data` and `<id>.manifest` side by side; writes in progress are
/// `.tmp-<id>-<random>` files in the same directory (so renames stay on one file system).
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

const DATA_EXT: &str = ".data";
const MANIFEST_EXT: &str = ".manifest";
const TMP_PREFIX: &str = ".tmp-";

impl LocalStore {
    /// A store in `root`, created (with parents) if missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        // Private: the manifests name sources and sizes, the data is only as safe as the key.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(|e| Error::io("create store directory", &root, e))?;
        Ok(Self { root })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn data_path(&self, id: &BackupId) -> PathBuf {
        self.root.join(format!("{id}{DATA_EXT}"))
    }

    fn manifest_path(&self, id: &BackupId) -> PathBuf {
        self.root.join(format!("{id}{MANIFEST_EXT}"))
    }

    fn temp_path(&self, id: &BackupId) -> Result<PathBuf> {
        let suffix: [u8; 6] = random_array()?;
        Ok(self
            .root
            .join(format!("{TMP_PREFIX}{id}-{}", hex::encode(suffix))))
    }
}

/// fsyncs the directory holding `path`, so a rename or create in it is durable.
pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(parent)
}

/// fsyncs a directory.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// Writes `bytes` to `path` atomically: temp file beside it, fsync, rename, fsync directory.
pub(crate) fn write_atomic(path: &Path, temp: &Path, bytes: &[u8]) -> Result<()> {
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(temp)
            .map_err(|e| Error::io("create", temp, e))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("write", temp, e))?;
        fs::rename(temp, path).map_err(|e| Error::io("rename into place", path, e))?;
        sync_parent(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(temp);
    }
    result
}

struct LocalWriter {
    file: Option<io::BufWriter<File>>,
    temp: PathBuf,
    path: PathBuf,
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(io::Error::other("writer already committed")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl DataWriter for LocalWriter {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let Some(buffered) = self.file.take() else {
            return Err(Error::Task("data writer committed twice".into()));
        };
        let file = buffered
            .into_inner()
            .map_err(|e| Error::io("write", &self.temp, e.into_error()))?;
        file.sync_all()
            .map_err(|e| Error::io("fsync", &self.temp, e))?;
        drop(file);
        fs::rename(&self.temp, &self.path)
            .map_err(|e| Error::io("rename into place", &self.path, e))?;
        sync_parent(&self.path)
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            // Not committed: the temp file is garbage. A crash skips this; `cleanup` finds it.
            self.file = None;
            let _ = fs::remove_file(&self.temp);
        }
    }
}

impl BackupStore for LocalStore {
    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }

    fn local_dir(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn create_data(&self, id: &BackupId) -> Result<Box<dyn DataWriter>> {
        let temp = self.temp_path(id)?;
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| Error::io("create", &temp, e))?;
        Ok(Box::new(LocalWriter {
            file: Some(io::BufWriter::with_capacity(256 * 1024, file)),
            temp,
            path: self.data_path(id),
        }))
    }

    fn open_data(&self, id: &BackupId) -> Result<Box<dyn Read + Send>> {
        let path = self.data_path(id);
        match File::open(&path) {
            Ok(f) => Ok(Box::new(io::BufReader::with_capacity(256 * 1024, f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::corrupt(
                id.as_str(),
                format!("data file {} is missing", path.display()),
            )),
            Err(e) => Err(Error::io("open", path, e)),
        }
    }

    fn put_manifest(&self, id: &BackupId, manifest: &[u8]) -> Result<()> {
        write_atomic(&self.manifest_path(id), &self.temp_path(id)?, manifest)
    }

    fn get_manifest(&self, id: &BackupId) -> Result<Vec<u8>> {
        let path = self.manifest_path(id);
        fs::read(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::NotFound {
                    backup_id: id.to_string(),
                }
            } else {
                Error::io("read", path, e)
            }
        })
    }

    fn list(&self) -> Result<Vec<BackupId>> {
        let mut ids = Vec::new();
        let entries =
            fs::read_dir(&self.root).map_err(|e| Error::io("list store", &self.root, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list store", &self.root, e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(MANIFEST_EXT)) else {
                continue;
            };
            if let Ok(id) = BackupId::parse(id) {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn delete(&self, id: &BackupId) -> Result<()> {
        let manifest = self.manifest_path(id);
        match fs::remove_file(&manifest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound {
                    backup_id: id.to_string(),
                });
            }
            Err(e) => return Err(Error::io("remove", manifest, e)),
        }
        sync_dir(&self.root)?;
        let data = self.data_path(id);
        match fs::remove_file(&data) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", data, e)),
        }
        sync_dir(&self.root)
    }

    fn cleanup(&self, older_than: Duration) -> Result<Vec<String>> {
        let now = SystemTime::now();
        let mut removed = Vec::new();
        let entries =
            fs::read_dir(&self.root).map_err(|e| Error::io("list store", &self.root, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list store", &self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = if name.starts_with(TMP_PREFIX) {
                true
            } else if let Some(id) = name.strip_suffix(DATA_EXT) {
                BackupId::parse(id).is_ok_and(|id| !self.manifest_path(&id).exists())
            } else {
                false
            };
            if !stale {
                continue;
            }
            let path = entry.path();
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .map_err(|e| Error::io("stat", &path, e))?;
            let age = now.duration_since(modified).unwrap_or_default();
            if age < older_than {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => removed.push(name),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", path, e)),
            }
        }
        if !removed.is_empty() {
            sync_dir(&self.root)?;
        }
        removed.sort();
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn store_files_are_private() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("new").join("store");
        let store = LocalStore::open(&root).expect("open store");
        let id = BackupId::parse("b-private").expect("id");
        let mut data = store.create_data(&id).expect("create");
        data.write_all(b"secret-ish").expect("write");
        data.commit().expect("commit");
        store.put_manifest(&id, b"{}").expect("manifest");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700, "the store directory");
        assert_eq!(
            mode(root.parent().expect("parent")),
            0o700,
            "created parents"
        );
        for entry in fs::read_dir(&root).expect("list") {
            let path = entry.expect("entry").path();
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
        assert_eq!(
            fs::read_dir(&root).expect("list").count(),
            2,
            "data and manifest"
        );
    }

    mod local_conformance {
        crate::backup_store_conformance!({
            let dir = tempfile::tempdir().expect("temp dir");
            let store = crate::LocalStore::open(dir.path().join("store")).expect("open store");
            (store, dir)
        });
    }
}
