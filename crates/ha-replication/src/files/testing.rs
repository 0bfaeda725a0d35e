//! The conformance suite every [`SyncTarget`] runs: the built-in [`LocalTarget`] and any remote
//! target alike.
//!
//! Each case is a public function taking a fresh, empty target; the
//! [`sync_target_conformance!`](crate::sync_target_conformance) macro turns them into one
//! `#[test]` per case for a target factory, which yields the target and a guard (a temporary
//! directory, a test server) that lives until the case ends:
//!
//! ```
//! mod local_target_conformance {
//!     ha_replication::sync_target_conformance!({
//!         let dir = tempfile::tempdir().unwrap();
//!         (ha_replication::files::LocalTarget::new(dir.path()), dir)
//!     });
//! }
//! ```
//!
//! The cases look at the target only through the trait, so they hold for any backend.
//!
//! [`LocalTarget`]: super::LocalTarget

use std::io::{self, Read};

use super::digest::Sha256;
use super::error::FileSyncError;
use super::target::{EntryMeta, FileAttrs, Mtime, SyncTarget};

/// An mtime in the past with nanoseconds, which a target must keep exactly.
pub const PAST: Mtime = Mtime {
    secs: 1_600_000_000,
    nanos: 123_456_789,
};

fn attrs(mode: u32) -> FileAttrs {
    FileAttrs { mode, mtime: PAST }
}

fn write(target: &dyn SyncTarget, path: &str, data: &[u8], mode: u32) {
    let written = target
        .write_file(path, &mut &data[..], attrs(mode))
        .unwrap_or_else(|e| panic!("{}: write {path}: {e}", target.describe()));
    assert_eq!(
        written,
        data.len() as u64,
        "{}: bytes written",
        target.describe()
    );
}

fn listed(target: &dyn SyncTarget, path: &str) -> Option<EntryMeta> {
    target
        .list()
        .unwrap_or_else(|e| panic!("{}: list: {e}", target.describe()))
        .remove(path)
}

/// A reader that gives `good` bytes, then fails.
struct FailingReader {
    good: usize,
}

impl Read for FailingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.good == 0 {
            return Err(io::Error::other("source gone"));
        }
        let n = buf.len().min(self.good);
        buf[..n].fill(b'n');
        self.good -= n;
        Ok(n)
    }
}

/// The lock has one holder at a time; dropping it frees the target.
pub fn lock_is_exclusive(target: &dyn SyncTarget) {
    let held = target.lock().expect("first lock");
    match target.lock() {
        Err(FileSyncError::TargetBusy { .. }) => {}
        Err(e) => panic!(
            "{}: second lock must be TargetBusy, got {e}",
            target.describe()
        ),
        Ok(_) => panic!("{}: second lock must fail while held", target.describe()),
    }
    drop(held);
    target.lock().expect("lock after release");
}

/// The listing holds the root as `""` and the entries written, never the target's own
/// bookkeeping (lock, manifest, temporary files).
pub fn list_shows_the_tree_and_hides_bookkeeping(target: &dyn SyncTarget) {
    let _lock = target.lock().expect("lock");
    target.create_dir("d").expect("create_dir");
    write(target, "d/f", b"data", 0o644);
    target.symlink("l", "d/f").expect("symlink");
    target.write_manifest(b"{}").expect("write_manifest");
    let list = target.list().expect("list");
    let paths: Vec<&str> = list.keys().map(String::as_str).collect();
    assert_eq!(paths, ["", "d", "d/f", "l"], "{}", target.describe());
    assert!(list[""].is_dir());
    assert_eq!(
        list["l"],
        EntryMeta::Symlink {
            target: "d/f".into()
        }
    );
}

/// A written file has the content, mode and mtime (to the nanosecond) it was given, and
/// hashes to the digest of its content; writing again replaces it.
pub fn write_file_keeps_content_and_attributes(target: &dyn SyncTarget) {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    write(target, "f", &data, 0o640);
    assert_eq!(
        listed(target, "f"),
        Some(EntryMeta::File {
            size: data.len() as u64,
            mtime: PAST,
            mode: 0o640,
        })
    );
    assert_eq!(target.hash_file("f").expect("hash"), Sha256::of(&data));
    write(target, "f", b"short", 0o600);
    assert_eq!(target.hash_file("f").expect("hash"), Sha256::of(b"short"));
    write(target, "empty", b"", 0o644);
    assert_eq!(target.hash_file("empty").expect("hash"), Sha256::of(b""));
}

/// A write whose data fails midway leaves the old file whole and nothing else visible.
pub fn failed_write_keeps_the_old_file(target: &dyn SyncTarget) {
    write(target, "f", b"old content", 0o644);
    let before = listed(target, "f");
    let result = target.write_file("f", &mut FailingReader { good: 100_000 }, attrs(0o644));
    assert!(
        result.is_err(),
        "{}: the write must fail",
        target.describe()
    );
    assert_eq!(
        target.hash_file("f").expect("hash"),
        Sha256::of(b"old content")
    );
    assert_eq!(listed(target, "f"), before, "{}", target.describe());
    // Nothing else is visible (the root's mtime may move: a temporary file came and went).
    let paths: Vec<String> = target.list().expect("list").into_keys().collect();
    assert_eq!(paths, ["", "f"], "{}", target.describe());
}

/// Writing a file over a link replaces the link; nothing is written where it pointed.
pub fn write_file_replaces_a_link_without_following_it(target: &dyn SyncTarget) {
    target.symlink("l", "elsewhere").expect("symlink");
    write(target, "l", b"now a file", 0o644);
    assert!(matches!(
        listed(target, "l"),
        Some(EntryMeta::File { size: 10, .. })
    ));
    assert_eq!(listed(target, "elsewhere"), None);
}

/// A link replaces a file and holds the text it was given; removing takes files, links and
/// empty directories, and refuses a directory that is not empty.
pub fn symlink_and_remove(target: &dyn SyncTarget) {
    write(target, "x", b"file", 0o644);
    target
        .symlink("x", "../not/followed")
        .expect("symlink over a file");
    assert_eq!(
        listed(target, "x"),
        Some(EntryMeta::Symlink {
            target: "../not/followed".into()
        })
    );
    target.create_dir("d").expect("create_dir");
    write(target, "d/f", b"f", 0o644);
    assert!(target.remove("d").is_err(), "a non-empty directory stays");
    target.remove("d/f").expect("remove file");
    target.remove("d").expect("remove empty dir");
    target.remove("x").expect("remove link");
    let paths: Vec<String> = target.list().expect("list").into_keys().collect();
    assert_eq!(paths, [""], "{}", target.describe());
}

/// Mode and mtime of files and directories can be set afterwards.
pub fn set_attrs_on_files_and_directories(target: &dyn SyncTarget) {
    write(target, "f", b"f", 0o644);
    target.create_dir("d").expect("create_dir");
    let later = Mtime {
        secs: PAST.secs + 10,
        nanos: 7,
    };
    target
        .set_attrs(
            "f",
            FileAttrs {
                mode: 0o600,
                mtime: later,
            },
        )
        .expect("set_attrs file");
    target
        .set_attrs(
            "d",
            FileAttrs {
                mode: 0o750,
                mtime: later,
            },
        )
        .expect("set_attrs dir");
    assert_eq!(
        listed(target, "f"),
        Some(EntryMeta::File {
            size: 1,
            mtime: later,
            mode: 0o600
        })
    );
    assert_eq!(
        listed(target, "d"),
        Some(EntryMeta::Dir {
            mode: 0o750,
            mtime: later
        })
    );
}

/// Paths that are not plain relative paths are refused, never resolved.
pub fn paths_leaving_the_root_are_refused(target: &dyn SyncTarget) {
    for bad in ["../x", "/x", "a//b", "a/./b", "a/../b", "a/"] {
        let refused = |result: Result<(), FileSyncError>, op: &str| match result {
            Err(FileSyncError::InvalidPath { .. }) => {}
            other => panic!(
                "{}: {op} {bad:?} must be refused, got {other:?}",
                target.describe()
            ),
        };
        refused(
            target
                .write_file(bad, &mut &b"x"[..], attrs(0o644))
                .map(drop),
            "write_file",
        );
        refused(target.create_dir(bad), "create_dir");
        refused(target.symlink(bad, "x"), "symlink");
        refused(target.remove(bad), "remove");
        refused(target.hash_file(bad).map(drop), "hash_file");
        refused(target.set_attrs(bad, attrs(0o644)), "set_attrs");
    }
}

/// The manifest is absent at first, then reads back as written, replaced whole.
pub fn manifest_round_trips(target: &dyn SyncTarget) {
    assert_eq!(target.read_manifest().expect("read_manifest"), None);
    target.write_manifest(b"first").expect("write_manifest");
    target
        .write_manifest(b"second, longer")
        .expect("write_manifest");
    assert_eq!(
        target.read_manifest().expect("read_manifest").as_deref(),
        Some(&b"second, longer"[..])
    );
    target.flush().expect("flush");
}

/// One `#[test]` per conformance case for the [`SyncTarget`] the factory expression makes.
/// The expression evaluates to `(target, guard)`; the guard is dropped after the case.
#[macro_export]
macro_rules! sync_target_conformance {
    ($make:expr) => {
        $crate::sync_target_conformance!(@cases $make;
            lock_is_exclusive,
            list_shows_the_tree_and_hides_bookkeeping,
            write_file_keeps_content_and_attributes,
            failed_write_keeps_the_old_file,
            write_file_replaces_a_link_without_following_it,
            symlink_and_remove,
            set_attrs_on_files_and_directories,
            paths_leaving_the_root_are_refused,
            manifest_round_trips,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let (target, _guard) = $make;
                $crate::files::testing::$case(&target);
            }
        )*
    };
}
