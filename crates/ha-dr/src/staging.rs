//! Where a restore to a path is staged before it takes the target's place, and the cleanup
//! of what a crashed restore left behind.
//!
//! A restore writes into a private (`0700`) staging directory or file and moves it into
//! place only after the whole backup verified. The staging must be on the target's own file
//! system, or the final rename fails (`EXDEV`) after all the work:
//!
//! - **beside** the target (a sibling in its parent directory) when the target is absent or
//!   is not a mount point: one rename replaces it whole;
//! - **inside** the target when it is a directory that is a mount point (its device differs
//!   from its parent's, or `/proc/self/mountinfo` lists it, as a bind mount on the same
//!   device): a mount point cannot be renamed or replaced, so the staged entries are moved
//!   into it one by one (each rename atomic, the whole not) and the staging directory
//!   removed. A mount point that holds anything (`lost+found` of a fresh ext4) needs
//!   `force`, like any non-empty directory.
//!
//! Names prove what is ours and how old it is: `.ha-dr-restore-<unix secs>-<12 hex>-<name>`
//! (staging) and `.ha-dr-old-<unix secs>-<12 hex>-<name>` (a replaced target on its way
//! out). A run holds an exclusive `flock` on its staging directory or file while it works.
//! Before staging, a run removes the staging leftovers in the same place that are older
//! than its own start and that no live run holds locked; an `old` leftover is removed only
//! beside a target that exists again (otherwise it may be the only copy: it is kept and
//! logged).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};
use crate::key::random_array;
use crate::store::{sync_dir, sync_parent};

const STAGE_PREFIX: &str = ".ha-dr-restore-";
const OLD_PREFIX: &str = ".ha-dr-old-";

/// Where the staging of a restore goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// A sibling of the target, renamed over it at the end.
    Beside,
    /// A directory inside the target (a mount point), whose entries are moved into it.
    Inside,
}

/// Whether `path` (an existing directory) is a mount point: its device differs from its
/// parent's, it is its own parent (`/`), or the kernel's mount table lists it.
pub(crate) fn is_mount_point(path: &Path) -> Result<bool> {
    let path = fs::canonicalize(path).map_err(|e| Error::io("resolve", path, e))?;
    let meta = fs::metadata(&path).map_err(|e| Error::io("stat", &path, e))?;
    let parent = path.join("..");
    let up = fs::metadata(&parent).map_err(|e| Error::io("stat", &parent, e))?;
    if differs_in_device_or_is_root((meta.dev(), meta.ino()), (up.dev(), up.ino())) {
        return Ok(true);
    }
    // A bind mount of a directory of the same file system keeps the device number.
    Ok(fs::read_to_string("/proc/self/mountinfo")
        .map(|table| mount_points(&table).any(|m| Path::new(&m) == path))
        .unwrap_or(false))
}

/// The device comparison: a directory whose (device, inode) is its parent's is `/`; one on
/// another device than its parent is a mount point.
pub(crate) fn differs_in_device_or_is_root(dir: (u64, u64), parent: (u64, u64)) -> bool {
    dir.0 != parent.0 || dir == parent
}

/// The mount points of a `/proc/self/mountinfo` table (field 5, octal escapes undone).
pub(crate) fn mount_points(table: &str) -> impl Iterator<Item = String> + '_ {
    table.lines().filter_map(|line| {
        let field = line.split(' ').nth(4)?;
        let bytes = field.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let octal = bytes
                .get(i + 1..i + 4)
                .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
            match octal {
                Some(d) => {
                    let value = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                    out.push(u8::try_from(value).unwrap_or(b'?'));
                    i += 4;
                }
                None => {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).ok()
    })
}

/// Where to stage a restore of a tree (`tree`) or a file to `target`.
pub(crate) fn placement(target: &Path, tree: bool) -> Result<Placement> {
    if !tree {
        return Ok(Placement::Beside);
    }
    match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() && is_mount_point(target)? => Ok(Placement::Inside),
        Ok(_) => Ok(Placement::Beside),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Placement::Beside),
        Err(e) => Err(Error::io("stat", target, e)),
    }
}

/// A name `<prefix><unix secs>-<12 hex>-<name>`.
fn fresh_name(prefix: &str, at: SystemTime, name: &str) -> Result<String> {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let suffix: [u8; 6] = random_array()?;
    Ok(format!("{prefix}{secs}-{}-{name}", hex::encode(suffix)))
}

/// Parses a name made by [`fresh_name`] with `prefix`: its time and the name it was for.
fn parse_name<'a>(prefix: &str, file_name: &'a str) -> Option<(u64, &'a str)> {
    let rest = file_name.strip_prefix(prefix)?;
    let (secs, rest) = rest.split_once('-')?;
    let (random, name) = rest.split_once('-')?;
    let ok = !secs.is_empty()
        && secs.len() <= 20
        && secs.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 12
        && random
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then(|| Some((secs.parse().ok()?, name)))?
}

/// The directory a target lives in.
fn parent_of(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn file_name_of(target: &Path, default: &str) -> String {
    target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| default.to_owned())
}

/// Removes the leftovers of crashed restores in `dir` (see the module docs): staging older
/// than `run_start` that no live run holds locked; `old` ones beside a target that exists
/// (only when `beside`). Returns the names removed.
pub(crate) fn clean_leftovers(
    dir: &Path,
    run_start: SystemTime,
    beside: bool,
) -> Result<Vec<String>> {
    let start = run_start
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some((secs, _)) = parse_name(STAGE_PREFIX, &name) {
            if secs >= start {
                continue;
            }
            // A live run holds its staging locked; the lock dies with a crashed one.
            let Ok(file) = File::open(&path) else {
                continue;
            };
            let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                continue;
            };
            remove_any(&path)?;
            drop(lock);
            tracing::info!(path = %path.display(), "removed the staging of a crashed restore");
            removed.push(name);
        } else if let Some((secs, target)) = parse_name(OLD_PREFIX, &name) {
            if secs >= start {
                continue;
            }
            if beside && fs::symlink_metadata(dir.join(target)).is_ok() {
                remove_any(&path)?;
                tracing::info!(path = %path.display(), "removed a target a crashed restore had replaced");
                removed.push(name);
            } else {
                tracing::warn!(
                    path = %path.display(),
                    "a crashed restore left the old target here and no restored one took its place: kept"
                );
            }
        }
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    removed.sort();
    Ok(removed)
}

fn remove_any(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", path, e)),
    };
    let removed = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io("remove", path, e)),
        _ => Ok(()),
    }
}

/// The private, locked staging of one restore; removed on drop unless committed.
pub(crate) struct Staging {
    path: PathBuf,
    target: PathBuf,
    placement: Placement,
    tree: bool,
    lock: Option<Flock<File>>,
    committed: bool,
}

impl Staging {
    /// Creates the staging for `target` (a `0700` directory if `tree`, else an empty `0600`
    /// file) at `placement`, after removing older leftovers there.
    pub(crate) fn create(
        target: &Path,
        tree: bool,
        placement: Placement,
        run_start: SystemTime,
    ) -> Result<Self> {
        let dir = match placement {
            Placement::Beside => {
                let parent = parent_of(target);
                fs::create_dir_all(&parent).map_err(|e| Error::io("create", &parent, e))?;
                parent
            }
            Placement::Inside => target.to_path_buf(),
        };
        clean_leftovers(&dir, run_start, placement == Placement::Beside)?;
        let path = dir.join(fresh_name(
            STAGE_PREFIX,
            run_start,
            &file_name_of(target, "target"),
        )?);
        let opened = if tree {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .and_then(|()| File::open(&path))
        } else {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
        };
        let mut staging = Self {
            path,
            target: target.to_path_buf(),
            placement,
            tree,
            lock: None,
            committed: false,
        };
        let file = opened.map_err(|e| Error::io("create", &staging.path, e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| Error::io("lock", &staging.path, io::Error::from(errno)))?;
        staging.lock = Some(lock);
        Ok(staging)
    }

    /// The staging directory or file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// For a file staging: the open (locked) file to write the restored bytes into.
    pub(crate) fn file(&mut self) -> Option<&mut File> {
        if self.tree {
            return None;
        }
        self.lock.as_deref_mut()
    }

    /// Moves the verified, synced staging into the target's place (what is there was checked
    /// by [`check_target`](crate::repo::check_target); with `force` it is replaced).
    pub(crate) fn commit(mut self, force: bool) -> Result<()> {
        match self.placement {
            Placement::Beside => replace(&self.path, &self.target, force)?,
            Placement::Inside => self.move_in(force)?,
        }
        self.committed = true;
        Ok(())
    }

    /// Moves the staged entries into the target (a mount point) one by one; with `force`,
    /// what the target held is first moved into an `old` directory inside it, removed at the
    /// end.
    fn move_in(&self, force: bool) -> Result<()> {
        let target = &self.target;
        let list = |dir: &Path| -> Result<Vec<std::ffi::OsString>> {
            let mut names = Vec::new();
            for entry in fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
                names.push(entry.map_err(|e| Error::io("list", dir, e))?.file_name());
            }
            Ok(names)
        };
        // Ours (this staging, and leftovers of other runs that are kept) stay where they are.
        let present: Vec<_> = list(target)?
            .into_iter()
            .filter(|n| !n.to_string_lossy().starts_with(".ha-dr-"))
            .collect();
        let mut old = None;
        if !present.is_empty() {
            if !force {
                return Err(Error::TargetNotEmpty {
                    target: target.display().to_string(),
                    reason: "entries appeared in it during the restore".into(),
                });
            }
            let aside = target.join(fresh_name(
                OLD_PREFIX,
                SystemTime::now(),
                &file_name_of(target, "target"),
            )?);
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&aside)
                .map_err(|e| Error::io("create", &aside, e))?;
            for name in &present {
                fs::rename(target.join(name), aside.join(name))
                    .map_err(|e| Error::io("move aside", target.join(name), e))?;
            }
            old = Some(aside);
        }
        for name in list(&self.path)? {
            fs::rename(self.path.join(&name), target.join(&name)).map_err(|e| {
                if let Some(old) = &old {
                    tracing::error!(old = %old.display(), "the target's former entries are kept here");
                }
                Error::io(
                    "move into place (any former entries of the target are in its .ha-dr-old-* directory)",
                    target.join(&name),
                    e,
                )
            })?;
        }
        // The restored root's mode (extract_dir put it on the staging directory).
        let mode = fs::metadata(&self.path)
            .map_err(|e| Error::io("stat", &self.path, e))?
            .permissions()
            .mode();
        fs::set_permissions(target, fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| Error::io("set mode of", target, e))?;
        fs::remove_dir(&self.path).map_err(|e| Error::io("remove", &self.path, e))?;
        sync_dir(target)?;
        if let Some(old) = old {
            remove_any(&old)?;
            sync_dir(target)?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = remove_any(&self.path);
        }
    }
}

/// Moves the verified `temp` to `target`, replacing what is there (already checked).
pub(crate) fn replace(temp: &Path, target: &Path, force: bool) -> Result<()> {
    match fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("stat", target, e)),
        Ok(meta) => {
            let empty_dir = meta.is_dir()
                && fs::read_dir(target)
                    .map_err(|e| Error::io("list", target, e))?
                    .next()
                    .is_none();
            if empty_dir {
                fs::remove_dir(target).map_err(|e| Error::io("remove", target, e))?;
            } else if force {
                let old = parent_of(target).join(fresh_name(
                    OLD_PREFIX,
                    SystemTime::now(),
                    &file_name_of(target, "target"),
                )?);
                fs::rename(target, &old).map_err(|e| Error::io("move aside", target, e))?;
                fs::rename(temp, target).map_err(|e| Error::io("rename into place", target, e))?;
                sync_parent(target)?;
                return remove_any(&old).map_err(|e| match e {
                    Error::Io { source, .. } => Error::io("remove old", &old, source),
                    other => other,
                });
            } else {
                return Err(Error::TargetNotEmpty {
                    target: target.display().to_string(),
                    reason: "it appeared during the restore".into(),
                });
            }
        }
    }
    fs::rename(temp, target).map_err(|e| Error::io("rename into place", target, e))?;
    sync_parent(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_device_comparison_finds_mount_points() {
        assert!(
            !differs_in_device_or_is_root((1, 10), (1, 2)),
            "same device"
        );
        assert!(
            differs_in_device_or_is_root((2, 2), (1, 10)),
            "another device"
        );
        assert!(
            differs_in_device_or_is_root((1, 2), (1, 2)),
            "its own parent: /"
        );
        // Real ones: /proc is a mount point on every Linux, a fresh directory is not.
        assert!(is_mount_point(Path::new("/proc")).expect("stat /proc"));
        assert!(is_mount_point(Path::new("/")).expect("stat /"));
        let dir = tempfile::tempdir().expect("temp dir");
        let plain = dir.path().join("plain");
        fs::create_dir(&plain).expect("mkdir");
        assert!(!is_mount_point(&plain).expect("stat"));
        assert_eq!(placement(&plain, true).expect("plan"), Placement::Beside);
        assert_eq!(
            placement(&dir.path().join("absent"), true).expect("plan"),
            Placement::Beside
        );
        assert_eq!(
            placement(Path::new("/proc"), true).expect("plan"),
            Placement::Inside
        );
        assert_eq!(
            placement(Path::new("/proc"), false).expect("plan"),
            Placement::Beside,
            "a file target is never a mount point we restore into"
        );
    }

    #[test]
    fn mountinfo_fields_are_unescaped() {
        let table = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                     40 22 8:1 /srv /mnt/with\\040space rw - ext4 /dev/sda1 rw\n\
                     short line\n";
        let points: Vec<String> = mount_points(table).collect();
        assert_eq!(points, ["/proc", "/mnt/with space"]);
    }

    #[test]
    fn names_round_trip_and_foreign_names_are_not_ours() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let name = fresh_name(STAGE_PREFIX, at, "my-data").expect("name");
        assert_eq!(
            parse_name(STAGE_PREFIX, &name),
            Some((1_700_000_000, "my-data"))
        );
        for foreign in [
            ".ha-dr-restore-data-0123456789ab",
            ".ha-dr-restore-12-xyz-data",
            ".ha-dr-restore-12-0123456789ab",
            "ha-dr-restore-12-0123456789ab-x",
        ] {
            assert_eq!(parse_name(STAGE_PREFIX, foreign), None, "{foreign}");
        }
    }

    /// Finding 12: a crashed restore's staging is removed by the next run, but only if it is
    /// ours by name, older than the run and not held by a live run; a replaced target is
    /// removed only once a restored one is in its place.
    #[test]
    fn leftovers_of_crashed_restores_are_cleaned() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let start = SystemTime::now();
        let past = start - Duration::from_secs(3600);
        let mkdir = |name: &str| {
            fs::create_dir(root.join(name)).expect("mkdir");
            fs::write(root.join(name).join("f"), b"x").expect("file");
            name.to_owned()
        };
        let crashed = mkdir(&fresh_name(STAGE_PREFIX, past, "data").expect("name"));
        let crashed_file = fresh_name(STAGE_PREFIX, past, "dump").expect("name");
        fs::write(root.join(&crashed_file), b"x").expect("file");
        let live = mkdir(&fresh_name(STAGE_PREFIX, past, "data").expect("name"));
        let _held = Flock::lock(
            File::open(root.join(&live)).expect("open"),
            FlockArg::LockExclusive,
        )
        .expect("lock");
        let current = mkdir(&fresh_name(STAGE_PREFIX, start, "data").expect("name"));
        let foreign = mkdir(".ha-dr-restore-data-0123456789ab");
        fs::create_dir(root.join("data")).expect("target");
        let old_replaced = mkdir(&fresh_name(OLD_PREFIX, past, "data").expect("name"));
        let old_only_copy = mkdir(&fresh_name(OLD_PREFIX, past, "gone").expect("name"));

        let removed = clean_leftovers(root, start, true).expect("clean");
        let mut want = vec![crashed.clone(), crashed_file.clone(), old_replaced.clone()];
        want.sort();
        assert_eq!(removed, want);
        for name in [&crashed, &crashed_file, &old_replaced] {
            assert!(!root.join(name).exists(), "{name} removed");
        }
        for name in [&live, &current, &foreign, &old_only_copy] {
            assert!(root.join(name).join("f").exists(), "{name} kept");
        }
        // Inside a mount point an old one is never removed (the move may have stopped half
        // way).
        let inside = tempfile::tempdir().expect("temp dir");
        fs::create_dir(inside.path().join("data")).expect("entry");
        let old = fresh_name(OLD_PREFIX, past, "data").expect("name");
        fs::create_dir(inside.path().join(&old)).expect("old");
        assert!(
            clean_leftovers(inside.path(), start, false)
                .expect("clean")
                .is_empty()
        );
        assert!(inside.path().join(&old).exists());
    }
}
