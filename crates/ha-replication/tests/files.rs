//! File replication scenarios on real directories: what is copied and kept, what is refused,
//! the deletion safety valve, target corruption, and interrupted copies.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod files_common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use files_common::{
    Node, chmod, config, dirs, local, mtime, set_mtime, snapshot, temp_files, write,
};
use ha_core::Validate;
use ha_replication::files::{
    DeletionRefusal, EntryMeta, FileAttrs, FileReplicator, FileSyncConfig, FileSyncError,
    LocalTarget, MANIFEST_NAME, Mismatch, Mtime, RefusalReason, Sha256, SpecialKind, SyncReport,
    SyncTarget, TEMP_PREFIX, TargetLock, VerifyReport,
};

/// A time well before any run, so that files carrying it are not "racily clean".
const PAST: Mtime = Mtime {
    secs: 1_600_000_000,
    nanos: 123_456_789,
};

/// A source tree with every kind of entry the replicator copies, all dated `PAST`.
fn sample_tree(root: &Path) {
    write(root, "a.txt", b"alpha\n");
    write(root, "empty", b"");
    write(
        root,
        "dir/b.bin",
        &(0..100_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
    );
    write(root, "dir/sub/c.sh", b"#!/bin/sh\necho c\n");
    write(root, "dir/sub/secret", b"s3cret");
    write(root, "ro/readonly.txt", b"read only\n");
    fs::create_dir_all(root.join("dir/emptydir")).unwrap();
    chmod(root, "dir/sub/c.sh", 0o755);
    chmod(root, "dir/sub/secret", 0o600);
    chmod(root, "ro/readonly.txt", 0o444);
    symlink("dir/b.bin", root.join("link-to-file")).unwrap();
    symlink("sub", root.join("dir/link-to-dir")).unwrap();
    symlink("../a.txt", root.join("dir/up-link")).unwrap();
    symlink("nowhere", root.join("dangling")).unwrap();
    for rel in [
        "a.txt",
        "empty",
        "dir/b.bin",
        "dir/sub/c.sh",
        "dir/sub/secret",
        "ro/readonly.txt",
    ] {
        set_mtime(root, rel, PAST);
    }
    chmod(root, "ro", 0o555);
}

fn sync(replicator: &FileReplicator) -> SyncReport {
    replicator.sync_blocking().unwrap()
}

fn verify(replicator: &FileReplicator) -> VerifyReport {
    replicator.verify_target_blocking().unwrap()
}

#[test]
fn first_sync_copies_everything_and_the_second_reads_nothing() {
    let (src, dst) = dirs();
    sample_tree(src.path());
    let replicator = local(src.path(), dst.path(), config());

    let first = sync(&replicator);
    assert!(first.is_clean(), "{first:?}");
    assert_eq!(first.files_copied, 6);
    assert_eq!(first.bytes_copied, 6 + 100_000 + 17 + 6 + 10);
    assert_eq!(first.symlinks_written, 4);
    assert_eq!(first.dirs_created, 4);
    assert_eq!(snapshot(dst.path()), snapshot(src.path()));
    assert!(dst.path().join(MANIFEST_NAME).is_file());
    assert!(temp_files(dst.path()).is_empty());

    let second = sync(&replicator);
    assert!(second.is_clean(), "{second:?}");
    assert_eq!(
        (
            second.files_copied,
            second.metadata_updated,
            second.symlinks_written
        ),
        (0, 0, 0)
    );
    assert_eq!(second.unchanged, 10);
    assert_eq!(second.bytes_hashed, 0, "unchanged files must not be read");
    assert_eq!(snapshot(dst.path()), snapshot(src.path()));

    let verified = verify(&replicator);
    assert!(verified.is_clean(), "{verified:?}");
    assert_eq!(verified.bytes_hashed, first.bytes_copied);

    // Reports are data: they survive a JSON round trip.
    let json = serde_json::to_string(&first).unwrap();
    assert_eq!(serde_json::from_str::<SyncReport>(&json).unwrap(), first);
    let json = serde_json::to_string(&verified).unwrap();
    assert_eq!(
        serde_json::from_str::<VerifyReport>(&json).unwrap(),
        verified
    );
}

#[test]
fn only_changed_files_are_copied_and_touched_ones_get_their_mtime() {
    let (src, dst) = dirs();
    sample_tree(src.path());
    let replicator = local(src.path(), dst.path(), config());
    sync(&replicator);

    write(src.path(), "a.txt", b"alpha, longer now\n");
    set_mtime(
        src.path(),
        "dir/sub/c.sh",
        Mtime {
            secs: 1_500_000_000,
            nanos: 0,
        },
    );
    chmod(src.path(), "dir/sub/secret", 0o640);
    let report = sync(&replicator);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.files_copied, 1);
    assert_eq!(report.bytes_copied, 18);
    assert_eq!(report.metadata_updated, 2, "{report:?}");
    // Only the touched file was read, on the source (the target's hash came from the
    // manifest).
    assert_eq!(report.bytes_hashed, 17);
    assert_eq!(snapshot(dst.path()), snapshot(src.path()));
}

#[test]
fn an_emptied_source_does_not_wipe_the_target_unless_allowed() {
    let (src, dst) = dirs();
    sample_tree(src.path());
    let replicator = local(src.path(), dst.path(), config());
    sync(&replicator);
    let before = snapshot(dst.path());

    chmod(src.path(), "ro", 0o755);
    for entry in fs::read_dir(src.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.is_symlink() {
            fs::remove_dir_all(path).unwrap();
        } else {
            fs::remove_file(path).unwrap();
        }
    }
    let report = sync(&replicator);
    let refused = report.deletions_refused.clone().unwrap();
    assert_eq!(refused.reason, DeletionRefusal::EmptySource);
    assert_eq!(refused.pending, 14);
    assert_eq!(report.deleted, 0);
    assert_eq!(snapshot(dst.path()), before);
    assert!(verify(&replicator).is_clean());

    let allowing = local(
        src.path(),
        dst.path(),
        FileSyncConfig {
            allow_empty_source: true,
            ..config()
        },
    );
    let report = sync(&allowing);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.deleted, 14);
    assert!(snapshot(dst.path()).is_empty());
    assert!(verify(&allowing).is_clean());
}

#[test]
fn deletions_over_the_cap_are_all_refused() {
    let (src, dst) = dirs();
    for i in 0..10 {
        write(src.path(), &format!("f{i}"), b"x");
    }
    let capped = FileSyncConfig {
        max_deletions: 3,
        ..config()
    };
    let replicator = local(src.path(), dst.path(), capped.clone());
    sync(&replicator);
    for i in 0..4 {
        fs::remove_file(src.path().join(format!("f{i}"))).unwrap();
    }
    let report = sync(&replicator);
    let refused = report.deletions_refused.clone().unwrap();
    assert_eq!(refused.reason, DeletionRefusal::OverCap { max: 3 });
    assert_eq!(refused.pending, 4);
    assert_eq!(report.deleted, 0);
    assert_eq!(snapshot(dst.path()).len(), 10);
    assert!(!report.is_clean());

    // Within the cap, they go.
    write(src.path(), "f0", b"x");
    let report = sync(&replicator);
    assert_eq!(report.deletions_refused, None);
    assert_eq!(report.deleted, 3);
    assert_eq!(snapshot(dst.path()), snapshot(src.path()));
}

#[test]
fn deletions_can_be_turned_off() {
    let (src, dst) = dirs();
    write(src.path(), "keep", b"1");
    write(src.path(), "gone", b"2");
    let replicator = local(
        src.path(),
        dst.path(),
        FileSyncConfig {
            delete: false,
            ..config()
        },
    );
    sync(&replicator);
    fs::remove_file(src.path().join("gone")).unwrap();
    let report = sync(&replicator);
    let refused = report.deletions_refused.unwrap();
    assert_eq!(
        (refused.reason, refused.pending),
        (DeletionRefusal::Disabled, 1)
    );
    assert!(dst.path().join("gone").exists());
    // The kept file stays in the manifest: the target is still what was written.
    assert!(verify(&replicator).is_clean());
}

#[test]
fn links_leaving_the_tree_are_refused_and_reported() {
    let (src, dst) = dirs();
    write(src.path(), "d/file", b"inside");
    symlink("/etc/passwd", src.path().join("abs")).unwrap();
    symlink("../../outside", src.path().join("d/climb")).unwrap();
    symlink("..", src.path().join("d/up")).unwrap(); // the root: fine
    symlink("up/../x", src.path().join("d/through")).unwrap(); // the root's parent
    symlink("file", src.path().join("d/ok")).unwrap();
    // Something the target already has where the source now has a bad link stays.
    write(dst.path(), "abs", b"old target file");
    let replicator = local(src.path(), dst.path(), config());
    let report = sync(&replicator);

    let refused: BTreeMap<_, _> = report
        .refused
        .iter()
        .map(|r| (r.path.as_str(), r.reason.clone()))
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert_eq!(
        refused["abs"],
        RefusalReason::SymlinkAbsolute {
            target: "/etc/passwd".into()
        }
    );
    assert_eq!(
        refused["d/climb"],
        RefusalReason::SymlinkEscapes {
            target: "../../outside".into()
        }
    );
    assert!(matches!(
        refused["d/through"],
        RefusalReason::SymlinkEscapes { .. }
    ));
    assert_eq!(
        fs::read(dst.path().join("abs")).unwrap(),
        b"old target file"
    );
    assert!(!dst.path().join("d/climb").exists() && !dst.path().join("d/climb").is_symlink());
    assert!(!dst.path().join("d/through").is_symlink());
    assert_eq!(
        fs::read_link(dst.path().join("d/up")).unwrap(),
        Path::new("..")
    );
    assert_eq!(
        fs::read_link(dst.path().join("d/ok")).unwrap(),
        Path::new("file")
    );
    assert_eq!(report.symlinks_written, 2);
    assert!(report.failed.is_empty());
    // The refusal is stable, and refusing is not a failure of the run.
    let again = sync(&replicator);
    assert_eq!(again.refused, report.refused);
    assert_eq!(again.deletions_refused, None);
}

#[test]
fn special_files_are_skipped_and_reported() {
    let (src, dst) = dirs();
    write(src.path(), "plain", b"p");
    nix::unistd::mkfifo(&src.path().join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(src.path().join("sock")).unwrap();
    write(src.path(), ".ha-sync-mine", b"reserved name");
    let replicator = local(src.path(), dst.path(), config());
    let report = sync(&replicator);
    let refused: Vec<_> = report
        .refused
        .iter()
        .map(|r| (r.path.as_str(), r.reason.clone()))
        .collect();
    assert_eq!(
        refused,
        vec![
            (".ha-sync-mine", RefusalReason::ReservedName),
            (
                "pipe",
                RefusalReason::Special {
                    kind: SpecialKind::Fifo
                }
            ),
            (
                "sock",
                RefusalReason::Special {
                    kind: SpecialKind::Socket
                }
            ),
        ]
    );
    assert_eq!(report.files_copied, 1);
    assert_eq!(snapshot(dst.path()).keys().collect::<Vec<_>>(), ["plain"]);
}

#[test]
fn target_corruption_is_found_by_verify_and_repaired_by_sync() {
    let (src, dst) = dirs();
    sample_tree(src.path());
    let replicator = local(src.path(), dst.path(), config());
    sync(&replicator);
    let t = dst.path();

    // A flipped byte (written through the filesystem, so the mtime moves).
    let mut bytes = fs::read(t.join("dir/b.bin")).unwrap();
    bytes[50_000] ^= 0x40;
    fs::write(t.join("dir/b.bin"), &bytes).unwrap();
    // Truncated, deleted, added, mode changed, a file turned into a directory.
    fs::OpenOptions::new()
        .write(true)
        .open(t.join("a.txt"))
        .unwrap()
        .set_len(2)
        .unwrap();
    fs::remove_file(t.join("dir/sub/c.sh")).unwrap();
    write(t, "dir/intruder", b"not from the source");
    chmod(t, "dir/sub/secret", 0o666);
    fs::remove_file(t.join("empty")).unwrap();
    fs::create_dir(t.join("empty")).unwrap();

    let found = verify(&replicator);
    assert!(!found.is_clean());
    assert_eq!(found.missing, ["dir/sub/c.sh"]);
    assert_eq!(found.extra, ["dir/intruder"]);
    let modified: BTreeMap<_, _> = found
        .modified
        .iter()
        .map(|m| (m.path.as_str(), m.mismatch.clone()))
        .collect();
    assert_eq!(modified.len(), 4, "{modified:?}");
    assert!(matches!(modified["dir/b.bin"], Mismatch::Content { .. }));
    assert_eq!(
        modified["a.txt"],
        Mismatch::Size {
            expected: 6,
            actual: 2
        }
    );
    assert_eq!(
        modified["dir/sub/secret"],
        Mismatch::Mode {
            expected: 0o600,
            actual: 0o666
        }
    );
    assert_eq!(
        modified["empty"],
        Mismatch::Kind {
            expected: "file".into(),
            actual: "directory".into()
        }
    );

    let repair = sync(&replicator);
    assert!(repair.is_clean(), "{repair:?}");
    assert_eq!(repair.files_copied, 4, "{repair:?}"); // b.bin, a.txt, c.sh, empty
    assert_eq!(repair.metadata_updated, 1); // secret's mode
    assert_eq!(repair.deleted, 2); // the intruder and the directory at `empty`
    assert_eq!(snapshot(t), snapshot(src.path()));
    assert!(verify(&replicator).is_clean());
}

#[test]
fn a_bit_flip_that_keeps_size_and_mtime_is_found_by_verify_and_repaired_by_checksum() {
    let (src, dst) = dirs();
    sample_tree(src.path());
    let replicator = local(src.path(), dst.path(), config());
    sync(&replicator);
    // Let the recorded mtimes stop being "racy" for the flip to hide behind the fast path.
    sync(&replicator);

    let path = dst.path().join("dir/b.bin");
    let before = mtime(dst.path(), "dir/b.bin");
    let mut file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    io::Seek::seek(&mut file, io::SeekFrom::Start(7)).unwrap();
    file.write_all(&[0xFF]).unwrap();
    drop(file);
    set_mtime(dst.path(), "dir/b.bin", before);

    // A plain sync trusts size + mtime (like rsync without --checksum) and skips it ...
    let plain = sync(&replicator);
    assert_eq!(plain.files_copied, 0);
    // ... verification finds it ...
    let found = verify(&replicator);
    assert_eq!(found.modified.len(), 1);
    assert_eq!(found.modified[0].path, "dir/b.bin");
    assert!(matches!(
        found.modified[0].mismatch,
        Mismatch::Content { .. }
    ));
    // ... and a checksum sync repairs it.
    let checksum = local(
        src.path(),
        dst.path(),
        FileSyncConfig {
            checksum: true,
            ..config()
        },
    );
    let repair = sync(&checksum);
    assert_eq!(repair.files_copied, 1, "{repair:?}");
    assert!(verify(&replicator).is_clean());
    assert_eq!(snapshot(dst.path()), snapshot(src.path()));
}

#[test]
fn a_same_size_rewrite_right_after_a_sync_is_not_missed() {
    let (src, dst) = dirs();
    write(src.path(), "hot", b"version 1");
    let replicator = local(src.path(), dst.path(), config());
    sync(&replicator);
    // Rewritten within the same timestamp tick as the copy: same size, same mtime.
    let tick = mtime(src.path(), "hot");
    write(src.path(), "hot", b"version 2");
    set_mtime(src.path(), "hot", tick);
    let report = sync(&replicator);
    assert_eq!(report.files_copied, 1, "{report:?}");
    assert_eq!(fs::read(dst.path().join("hot")).unwrap(), b"version 2");
}

#[test]
fn type_changes_are_replicated() {
    let (src, dst) = dirs();
    let s = src.path();
    write(s, "file-to-dir", b"f");
    write(s, "dir-to-file/inner", b"i");
    write(s, "link-to-file", b"target");
    symlink("file-to-dir", s.join("file-to-link")).unwrap();
    write(s, "dir-to-link/x", b"x");
    let replicator = local(s, dst.path(), config());
    sync(&replicator);

    fs::remove_file(s.join("file-to-dir")).unwrap();
    write(s, "file-to-dir/now", b"a dir");
    fs::remove_dir_all(s.join("dir-to-file")).unwrap();
    write(s, "dir-to-file", b"a file");
    fs::rename(s.join("link-to-file"), s.join("tmp")).unwrap();
    fs::rename(s.join("file-to-link"), s.join("link-to-file")).unwrap();
    fs::rename(s.join("tmp"), s.join("file-to-link")).unwrap();
    fs::remove_dir_all(s.join("dir-to-link")).unwrap();
    symlink("file-to-dir", s.join("dir-to-link")).unwrap();
    let report = sync(&replicator);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(snapshot(dst.path()), snapshot(s));
    assert!(verify(&replicator).is_clean());
}

#[test]
fn a_directory_in_the_way_of_a_file_needs_deletions() {
    let (src, dst) = dirs();
    write(src.path(), "x/a", b"a");
    write(src.path(), "x/b", b"b");
    let replicator = local(
        src.path(),
        dst.path(),
        FileSyncConfig {
            max_deletions: 2,
            ..config()
        },
    );
    sync(&replicator);
    fs::remove_dir_all(src.path().join("x")).unwrap();
    write(src.path(), "x", b"now a file");
    let report = sync(&replicator);
    // x, x/a, x/b: three deletions, over the cap of two.
    assert_eq!(
        report
            .deletions_refused
            .as_ref()
            .map(|d| (&d.reason, d.pending)),
        Some((&DeletionRefusal::OverCap { max: 2 }, 3))
    );
    assert_eq!(report.refused.len(), 1);
    assert_eq!(report.refused[0].path, "x");
    assert_eq!(report.refused[0].reason, RefusalReason::NeedsDeletion);
    assert!(dst.path().join("x/a").is_file());
}

// -- interrupted and corrupted copies -------------------------------------------------------

/// What the faulty target does to the data stream of one file.
enum Fault {
    /// The stream fails after this many bytes (a disk error, a dropped connection).
    FailAfter(u64),
    /// One byte is flipped on the way to the disk.
    FlipByte,
    /// The source file grows while it is being copied.
    GrowSource(PathBuf),
}

/// A [`LocalTarget`] that applies a fault to writes of one path.
struct Faulty {
    inner: LocalTarget,
    path: String,
    fault: Fault,
}

struct FaultyReader<'a> {
    inner: &'a mut dyn Read,
    fault: &'a Fault,
    passed: u64,
}

impl Read for FaultyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limit = match self.fault {
            Fault::FailAfter(n) if self.passed >= *n => {
                return Err(io::Error::other("disk on fire"));
            }
            Fault::FailAfter(n) => (*n - self.passed).min(buf.len() as u64) as usize,
            _ => buf.len().min(1000),
        };
        let n = self.inner.read(&mut buf[..limit])?;
        match self.fault {
            Fault::FlipByte if self.passed == 0 && n > 0 => buf[0] ^= 1,
            Fault::GrowSource(path) if self.passed == 0 => {
                let mut file = fs::OpenOptions::new().append(true).open(path).unwrap();
                file.write_all(b"appended while copying").unwrap();
            }
            _ => {}
        }
        self.passed += n as u64;
        Ok(n)
    }
}

impl SyncTarget for Faulty {
    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }
    fn lock(&self) -> Result<TargetLock, FileSyncError> {
        self.inner.lock()
    }
    fn list(&self) -> Result<BTreeMap<String, EntryMeta>, FileSyncError> {
        self.inner.list()
    }
    fn write_file(
        &self,
        path: &str,
        data: &mut dyn Read,
        attrs: FileAttrs,
    ) -> Result<u64, FileSyncError> {
        if path != self.path {
            return self.inner.write_file(path, data, attrs);
        }
        let mut reader = FaultyReader {
            inner: data,
            fault: &self.fault,
            passed: 0,
        };
        self.inner.write_file(path, &mut reader, attrs)
    }
    fn set_attrs(&self, path: &str, attrs: FileAttrs) -> Result<(), FileSyncError> {
        self.inner.set_attrs(path, attrs)
    }
    fn create_dir(&self, path: &str) -> Result<(), FileSyncError> {
        self.inner.create_dir(path)
    }
    fn symlink(&self, path: &str, link_target: &str) -> Result<(), FileSyncError> {
        self.inner.symlink(path, link_target)
    }
    fn remove(&self, path: &str) -> Result<(), FileSyncError> {
        self.inner.remove(path)
    }
    fn hash_file(&self, path: &str) -> Result<Sha256, FileSyncError> {
        self.inner.hash_file(path)
    }
    fn read_manifest(&self) -> Result<Option<Vec<u8>>, FileSyncError> {
        self.inner.read_manifest()
    }
    fn write_manifest(&self, bytes: &[u8]) -> Result<(), FileSyncError> {
        self.inner.write_manifest(bytes)
    }
    fn flush(&self) -> Result<(), FileSyncError> {
        self.inner.flush()
    }
}

fn faulty(src: &Path, dst: &Path, path: &str, fault: Fault) -> FileReplicator {
    let target = Faulty {
        inner: LocalTarget::new(dst),
        path: path.into(),
        fault,
    };
    FileReplicator::new(src, target, config()).unwrap()
}

#[test]
fn a_copy_failing_halfway_keeps_the_old_file_and_leaves_no_temporary_file() {
    let (src, dst) = dirs();
    let old: Vec<u8> = vec![b'o'; 300_000];
    let new: Vec<u8> = vec![b'n'; 400_000];
    write(src.path(), "big", &old);
    write(src.path(), "other", b"other v1");
    sync(&local(src.path(), dst.path(), config()));

    write(src.path(), "big", &new);
    write(src.path(), "other", b"other v2");
    let broken = faulty(src.path(), dst.path(), "big", Fault::FailAfter(200_000));
    let report = sync(&broken);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].path, "big");
    assert!(
        report.failed[0].error.contains("disk on fire"),
        "{report:?}"
    );
    assert!(report.failed[0].retryable);
    assert_eq!(report.files_copied, 1); // `other` went through
    assert_eq!(fs::read(dst.path().join("big")).unwrap(), old);
    assert!(temp_files(dst.path()).is_empty());
    // Verification still sees the old, intact copy the manifest records.
    assert!(verify(&broken).is_clean());

    // A crash mid-copy leaves a temporary file; the next run removes it and finishes the job.
    write(dst.path(), &format!("{TEMP_PREFIX}4242-0"), &new[..1000]);
    let healed = sync(&local(src.path(), dst.path(), config()));
    assert!(healed.is_clean(), "{healed:?}");
    assert_eq!(healed.files_copied, 1);
    assert_eq!(fs::read(dst.path().join("big")).unwrap(), new);
    assert!(temp_files(dst.path()).is_empty());
}

#[test]
fn local_target_write_failing_midway_leaves_the_old_file() {
    let dst = tempfile::tempdir().unwrap();
    write(dst.path(), "f", b"old content");
    let target = LocalTarget::new(dst.path());
    let mut failing = FaultyReader {
        inner: &mut &[7u8; 10_000][..],
        fault: &Fault::FailAfter(5_000),
        passed: 0,
    };
    let attrs = FileAttrs {
        mode: 0o644,
        mtime: PAST,
    };
    let err = target.write_file("f", &mut failing, attrs).unwrap_err();
    assert!(err.to_string().contains("disk on fire"), "{err}");
    assert_eq!(fs::read(dst.path().join("f")).unwrap(), b"old content");
    assert!(temp_files(dst.path()).is_empty());
    // Paths that are not the replicator's are refused, not resolved.
    for bad in ["../escape", "/abs", "a//b", ""] {
        let err = target.write_file(bad, &mut &b"x"[..], attrs).unwrap_err();
        assert!(
            matches!(err, FileSyncError::InvalidPath { .. }),
            "{bad}: {err}"
        );
    }
}

#[test]
fn a_source_file_changing_during_its_copy_is_not_committed() {
    let (src, dst) = dirs();
    write(src.path(), "log", &[b'1'; 50_000]);
    sync(&local(src.path(), dst.path(), config()));
    write(src.path(), "log", &[b'2'; 60_000]);
    let growing = faulty(
        src.path(),
        dst.path(),
        "log",
        Fault::GrowSource(src.path().join("log")),
    );
    let report = sync(&growing);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert!(
        report.failed[0]
            .error
            .contains("changed while it was being synced")
    );
    assert_eq!(fs::read(dst.path().join("log")).unwrap(), [b'1'; 50_000]);
    assert!(temp_files(dst.path()).is_empty());
    let settled = sync(&local(src.path(), dst.path(), config()));
    assert!(settled.is_clean(), "{settled:?}");
    assert_eq!(snapshot(dst.path()), snapshot(src.path()));
}

#[test]
fn a_copy_that_does_not_hash_equal_on_the_target_fails_naming_the_file() {
    let (src, dst) = dirs();
    write(src.path(), "dir/data", b"payload that gets corrupted");
    let corrupting = faulty(src.path(), dst.path(), "dir/data", Fault::FlipByte);
    let report = sync(&corrupting);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].path, "dir/data");
    assert!(
        report.failed[0]
            .error
            .starts_with("dir/data: the copy on the target does not match"),
        "{report:?}"
    );
    // Not recorded as good: verification flags it, the next sound run rewrites it.
    assert!(!verify(&corrupting).is_clean());
    let fixed = sync(&local(src.path(), dst.path(), config()));
    assert_eq!(fixed.files_copied, 1, "{fixed:?}");
    assert!(verify(&corrupting).is_clean());
}

// -- refusals of whole runs -------------------------------------------------------------------

#[test]
fn a_second_run_is_refused_while_the_target_is_locked() {
    let (src, dst) = dirs();
    write(src.path(), "f", b"1");
    let replicator = local(src.path(), dst.path(), config());
    let held = replicator.target().lock().unwrap();
    let err = replicator.sync_blocking().unwrap_err();
    assert!(matches!(err, FileSyncError::TargetBusy { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(replicator.verify_target_blocking().is_err());
    drop(held);
    assert!(sync(&replicator).is_clean());
}

#[test]
fn a_missing_source_or_target_root_fails_without_changes() {
    let (src, dst) = dirs();
    write(dst.path(), "precious", b"keep me");
    let gone = src.path().join("unmounted");
    let err = local(&gone, dst.path(), config())
        .sync_blocking()
        .unwrap_err();
    assert!(
        matches!(err, FileSyncError::SourceUnavailable { .. }),
        "{err}"
    );
    assert!(err.is_retryable());
    assert!(err.to_string().contains("unmounted"), "{err}");
    assert_eq!(snapshot(dst.path()).len(), 1);

    let missing = dst.path().join("not-there");
    let err = local(src.path(), &missing, config())
        .sync_blocking()
        .unwrap_err();
    assert!(
        matches!(err, FileSyncError::TargetUnavailable { .. }),
        "{err}"
    );
    assert!(!missing.exists(), "the target root must not be created");
}

#[test]
fn an_unreadable_manifest_is_rebuilt_by_hashing_not_copying() {
    let (src, dst) = dirs();
    sample_tree(src.path());
    let replicator = local(src.path(), dst.path(), config());
    sync(&replicator);
    fs::write(dst.path().join(MANIFEST_NAME), b"{ not json").unwrap();
    let found = verify(&replicator);
    assert!(found.manifest_problem.is_some());
    assert_eq!(found.extra.len(), 14);
    let report = sync(&replicator);
    assert!(report.manifest_discarded.is_some());
    assert_eq!(report.files_copied, 0, "{report:?}");
    assert!(verify(&replicator).is_clean());
}

#[test]
fn invalid_config_is_rejected_up_front() {
    let bad = FileSyncConfig {
        parallelism: 0,
        ..FileSyncConfig::default()
    };
    assert!(bad.validate().is_err());
    let err = FileReplicator::local("/nonexistent", "/nonexistent", bad).unwrap_err();
    assert!(matches!(err, FileSyncError::Config(_)));
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_api_runs_on_the_blocking_pool() {
    let (src, dst) = dirs();
    sample_tree(src.path());
    let replicator = local(src.path(), dst.path(), config());
    let report = replicator.sync().await.unwrap();
    assert_eq!(report.files_copied, 6);
    let (again, verified) = tokio::join!(replicator.sync(), async {
        tokio::task::yield_now().await;
        Ok::<_, FileSyncError>(())
    });
    assert!(again.unwrap().is_clean());
    verified.unwrap();
    assert!(replicator.verify_target().await.unwrap().is_clean());
    assert_eq!(snapshot(dst.path()), snapshot(src.path()));
    let _ = Node::Other;
}
