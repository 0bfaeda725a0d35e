//! Helpers shared by the file replication tests: trees on disk and snapshots to compare.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ha_replication::files::{
    FileReplicator, FileSyncConfig, Mtime, RESERVED_PREFIX, Sha256, TEMP_PREFIX,
};

/// An entry as the tests compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    File {
        /// Length and SHA-256 of the content (short in failure messages).
        content: (u64, Sha256),
        mode: u32,
        mtime: Mtime,
    },
    Dir {
        mode: u32,
        mtime: Mtime,
    },
    Link(String),
    Other,
}

/// Every entry under `root` (links not followed), without the replicator's own files.
pub(crate) fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![(String::new(), root.to_path_buf())];
    while let Some((rel, abs)) = dirs.pop() {
        for entry in fs::read_dir(&abs).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            if name.starts_with(RESERVED_PREFIX) {
                continue;
            }
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = entry.metadata().unwrap();
            let mode = meta.mode() & 0o7777;
            let node = if meta.is_file() {
                Node::File {
                    content: {
                        let bytes = fs::read(entry.path()).unwrap();
                        (bytes.len() as u64, Sha256::of(&bytes))
                    },
                    mode,
                    mtime: Mtime::of(&meta),
                }
            } else if meta.is_dir() {
                dirs.push((path.clone(), entry.path()));
                Node::Dir {
                    mode,
                    mtime: Mtime::of(&meta),
                }
            } else if meta.file_type().is_symlink() {
                Node::Link(
                    fs::read_link(entry.path())
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .into(),
                )
            } else {
                Node::Other
            };
            out.insert(path, node);
        }
    }
    out
}

/// Writes `content` at `rel` under `root`, creating parent directories.
pub(crate) fn write(root: &Path, rel: &str, content: &[u8]) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

pub(crate) fn chmod(root: &Path, rel: &str, mode: u32) {
    fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).unwrap();
}

/// Sets the mtime of `rel` (a file or directory).
pub(crate) fn set_mtime(root: &Path, rel: &str, mtime: Mtime) {
    let file = fs::File::open(root.join(rel)).unwrap();
    file.set_times(fs::FileTimes::new().set_modified(mtime.to_system_time()))
        .unwrap();
}

pub(crate) fn mtime(root: &Path, rel: &str) -> Mtime {
    Mtime::of(&fs::symlink_metadata(root.join(rel)).unwrap())
}

/// Temporary files of the replicator anywhere under `root`.
pub(crate) fn temp_files(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                found.push(entry.path());
            }
            if entry.file_type().unwrap().is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    found
}

/// A config for tests: two workers, small buffers (so files span several reads).
pub(crate) fn config() -> FileSyncConfig {
    FileSyncConfig {
        parallelism: 2,
        buffer_size: 4096,
        ..FileSyncConfig::default()
    }
}

pub(crate) fn local(source: &Path, target: &Path, config: FileSyncConfig) -> FileReplicator {
    FileReplicator::local(source, target, config).unwrap()
}

/// Source and target temporary directories.
pub(crate) fn dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap())
}
