//! What can be backed up ([`Source`]) and how each kind is written into a backup stream and
//! read back out of one.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, from_io};
use crate::manifest::{BackupKind, Details};
use crate::pg::PgTools;

/// Something to back up.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Source {
    /// A directory tree, as a tar stream: regular files, directories and symlinks (stored as
    /// links, never followed), with permissions and mtimes. Sockets are skipped.
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
        }
    }

    /// A description for the manifest (paths as given; URLs without password).
    pub fn describe(&self) -> String {
        match self {
            Source::Dir(p) | Source::File(p) => p.display().to_string(),
            Source::Config(c) => format!("config:{}", c.name),
            Source::Postgres { url, .. } => crate::pg::redact(url),
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

/// Writes a directory tree into `out` as tar; returns the number of entries.
pub(crate) fn write_dir(root: &Path, out: &mut dyn Write) -> Result<Details> {
    let meta = fs::symlink_metadata(root).map_err(|e| Error::io("stat", root, e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            "back up directory",
            root,
            io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    let mut entries = 0u64;
    // The root itself, so its mode and mtime come back too.
    builder
        .append_dir(".", root)
        .map_err(|e| tar_err(e, root))?;
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
            let meta = fs::symlink_metadata(&path).map_err(|e| Error::io("stat", &path, e))?;
            let file_type = meta.file_type();
            if std::os::unix::fs::FileTypeExt::is_socket(&file_type) {
                tracing::debug!(path = %path.display(), "socket skipped");
                continue;
            }
            builder
                .append_path_with_name(&path, &rel_path)
                .map_err(|e| tar_err(e, &path))?;
            entries += 1;
            if file_type.is_dir() {
                stack.push(rel_path);
            }
        }
    }
    builder.finish().map_err(|e| tar_err(e, root))?;
    Ok(Details::Dir { entries })
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
    let mut file = fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    // Anything readable but a directory: regular files, and pipes such as `/dev/stdin`.
    if file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .is_dir()
    {
        return Err(Error::io(
            "back up file",
            path,
            io::Error::new(
                io::ErrorKind::IsADirectory,
                "a directory (use a dir source)",
            ),
        ));
    }
    io::copy(&mut file, out).map_err(|e| match from_io(e, String::new) {
        Error::Stream { source, .. } => Error::io("read", path, source),
        other => other,
    })?;
    Ok(Details::None)
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

/// Extracts a tar stream into the (new, empty) directory `dest`, refusing any entry that
/// would land outside it. Returns the number of entries.
/// Extracts the tar stream `input` into `dest`; `written` hears of each regular file once it
/// is complete (a restore starts flushing it to disk while the rest is extracted).
pub(crate) fn extract_dir(
    backup_id: &str,
    input: &mut dyn Read,
    dest: &Path,
    written: &mut dyn FnMut(PathBuf),
) -> Result<u64> {
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(false);
    archive.set_unpack_xattrs(false);
    let unsafe_entry = |entry: &str, reason: &str| Error::UnsafeEntry {
        backup_id: backup_id.to_owned(),
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    };
    let read_err = |e: io::Error| from_io(e, || format!("read tar stream of backup {backup_id}"));
    let mut count = 0u64;
    // Directories last (as `tar::Archive::unpack` does), so that their modes (a read-only
    // directory) and mtimes are set after their contents are written.
    let mut directories = Vec::new();
    let mut root = None;
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let path = entry.path().map_err(read_err)?.into_owned();
        let shown = path.display().to_string();
        if !is_contained(&path) {
            return Err(unsafe_entry(
                &shown,
                "absolute or `..` path escapes the target",
            ));
        }
        let kind = entry.header().entry_type();
        if kind.is_hard_link() {
            let target = entry.link_name().map_err(read_err)?;
            if !target.as_deref().is_some_and(is_contained) {
                return Err(unsafe_entry(&shown, "hard link to outside the target"));
            }
        }
        if !(kind.is_file()
            || kind.is_dir()
            || kind.is_symlink()
            || kind.is_hard_link()
            || kind.is_fifo()
            || kind == tar::EntryType::Continuous
            || kind.is_pax_global_extensions())
        {
            return Err(unsafe_entry(
                &shown,
                "entry type not restored (device or unknown)",
            ));
        }
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
        if kind.is_file() || kind == tar::EntryType::Continuous {
            written(dest.join(&path));
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
            .and_then(|()| fs::set_permissions(dest, fs::Permissions::from_mode(mode & 0o7777)))
            .map_err(|e| Error::io("set mode and mtime of", dest, e))?;
    }
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
}
