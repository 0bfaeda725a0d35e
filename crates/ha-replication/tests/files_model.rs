//! Property tests of file replication: random trees edited by random sequences of creates,
//! rewrites, appends, deletes, renames, mode and mtime changes, links inside the tree, target
//! corruption and emptied sources, with a sync now and then. After every sync the target
//! equals the source (paths, contents, modes, mtimes, link texts) unless the deletion safety
//! valve held, which it must do exactly when the source is empty or the deletions exceed the
//! cap; and `verify_target` agrees with what it finds.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod files_common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use files_common::{Node, chmod, config, local, set_mtime, snapshot, write};
use ha_replication::files::{DeletionRefusal, FileSyncConfig, Mtime, RefusalReason, SyncReport};
use proptest::prelude::*;

const NAMES: [&str; 3] = ["a", "b", "c"];
const FILE_MODES: [u32; 4] = [0o644, 0o600, 0o755, 0o444];
const DIR_MODES: [u32; 3] = [0o755, 0o700, 0o750];

/// Every path the edits may touch: one to three components from `NAMES`.
fn universe() -> Vec<String> {
    let mut paths = Vec::new();
    for a in NAMES {
        paths.push(a.to_owned());
        for b in NAMES {
            paths.push(format!("{a}/{b}"));
            for c in NAMES {
                paths.push(format!("{a}/{b}/{c}"));
            }
        }
    }
    paths
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        path: usize,
        len: usize,
        byte: u8,
        mode: usize,
    },
    Append {
        path: usize,
        len: usize,
    },
    Mkdir {
        path: usize,
        mode: usize,
    },
    Remove {
        path: usize,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Link {
        path: usize,
        to: usize,
    },
    Chmod {
        path: usize,
        mode: usize,
    },
    Touch {
        path: usize,
        secs: i64,
    },
    CorruptTarget {
        pick: usize,
        how: u8,
    },
    EmptySource,
    Sync,
}

fn op() -> impl Strategy<Value = Op> {
    let n = universe().len();
    prop_oneof![
        6 => (0..n, prop_oneof![0..64usize, 0..20_000usize], any::<u8>(), 0..FILE_MODES.len())
            .prop_map(|(path, len, byte, mode)| Op::Write { path, len, byte, mode }),
        2 => (0..n, 1..5000usize).prop_map(|(path, len)| Op::Append { path, len }),
        2 => (0..n, 0..DIR_MODES.len()).prop_map(|(path, mode)| Op::Mkdir { path, mode }),
        2 => (0..n).prop_map(|path| Op::Remove { path }),
        2 => (0..n, 0..n).prop_map(|(from, to)| Op::Rename { from, to }),
        2 => (0..n, 0..n).prop_map(|(path, to)| Op::Link { path, to }),
        1 => (0..n, 0..FILE_MODES.len()).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        1 => (0..n, 0..1_000_000i64).prop_map(|(path, secs)| Op::Touch { path, secs }),
        1 => (any::<usize>(), 0..4u8).prop_map(|(pick, how)| Op::CorruptTarget { pick, how }),
        1 => Just(Op::EmptySource),
        3 => Just(Op::Sync),
    ]
}

/// The metadata of `rel` itself, if it exists with only real directories above it (edits
/// never reach through links).
fn entry(root: &Path, rel: &str) -> Option<fs::Metadata> {
    let mut path = root.to_path_buf();
    let components: Vec<&str> = rel.split('/').collect();
    for component in &components[..components.len() - 1] {
        path.push(component);
        if !fs::symlink_metadata(&path).ok()?.is_dir() {
            return None;
        }
    }
    fs::symlink_metadata(root.join(rel)).ok()
}

fn remove_any(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path).unwrap(),
        Ok(_) => fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}

/// Makes every ancestor of `rel` a real directory, replacing files and links in the way.
fn make_parents(root: &Path, rel: &str) {
    let mut prefix = root.to_path_buf();
    let components: Vec<&str> = rel.split('/').collect();
    for component in &components[..components.len() - 1] {
        prefix.push(component);
        match fs::symlink_metadata(&prefix) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&prefix).unwrap();
                fs::create_dir(&prefix).unwrap();
            }
            Err(_) => fs::create_dir(&prefix).unwrap(),
        }
    }
}

/// The link text from `rel`'s directory to `to`, without leaving the tree.
fn relative_link(rel: &str, to: &str) -> String {
    let from: Vec<&str> = rel.split('/').collect();
    let from = &from[..from.len() - 1];
    let to: Vec<&str> = to.split('/').collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<&str> = vec![".."; from.len() - common];
    parts.extend(&to[common..]);
    if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    }
}

/// Applies an edit to the source tree.
fn apply(src: &Path, op: &Op, paths: &[String]) {
    match *op {
        Op::Write {
            path,
            len,
            byte,
            mode,
        } => {
            let rel = &paths[path];
            make_parents(src, rel);
            remove_any(&src.join(rel));
            write(src, rel, &vec![byte; len]);
            chmod(src, rel, FILE_MODES[mode]);
        }
        Op::Append { path, len } => {
            let abs = src.join(&paths[path]);
            if entry(src, &paths[path]).is_some_and(|m| m.is_file()) {
                let mut bytes = fs::read(&abs).unwrap();
                bytes.extend(std::iter::repeat_n(b'+', len));
                fs::write(&abs, bytes).unwrap();
            }
        }
        Op::Mkdir { path, mode } => {
            let rel = &paths[path];
            make_parents(src, rel);
            let abs = src.join(rel);
            if !fs::symlink_metadata(&abs).is_ok_and(|m| m.is_dir()) {
                remove_any(&abs);
                fs::create_dir(&abs).unwrap();
            }
            chmod(src, rel, DIR_MODES[mode]);
        }
        Op::Remove { path } => remove_any(&src.join(&paths[path])),
        Op::Rename { from, to } => {
            let (from, to) = (&paths[from], &paths[to]);
            let nested = to.starts_with(&format!("{from}/")) || from.starts_with(&format!("{to}/"));
            if from == to || nested || entry(src, from).is_none() {
                return;
            }
            make_parents(src, to);
            remove_any(&src.join(to));
            fs::rename(src.join(from), src.join(to)).unwrap();
        }
        Op::Link { path, to } => {
            let rel = &paths[path];
            make_parents(src, rel);
            remove_any(&src.join(rel));
            symlink(relative_link(rel, &paths[to]), src.join(rel)).unwrap();
        }
        Op::Chmod { path, mode } => {
            let rel = &paths[path];
            match entry(src, rel).ok_or(()) {
                Ok(m) if m.is_file() => chmod(src, rel, FILE_MODES[mode]),
                Ok(m) if m.is_dir() => chmod(src, rel, DIR_MODES[mode % DIR_MODES.len()]),
                _ => {}
            }
        }
        Op::Touch { path, secs } => {
            let rel = &paths[path];
            if entry(src, rel).is_some_and(|m| !m.is_symlink()) {
                let mtime = Mtime {
                    secs: 1_500_000_000 + secs,
                    nanos: (secs % 1000) as u32 * 1_000_000,
                };
                set_mtime(src, rel, mtime);
            }
        }
        Op::EmptySource => {
            for entry in fs::read_dir(src).unwrap() {
                remove_any(&entry.unwrap().path());
            }
        }
        Op::Sync | Op::CorruptTarget { .. } => unreachable!("not a source edit"),
    }
}

/// Damages one target file (or adds one); returns whether anything changed.
fn corrupt(dst: &Path, pick: usize, how: u8, serial: usize) -> bool {
    if how == 3 {
        write(dst, &format!("intruder{serial}"), b"not from the source");
        return true;
    }
    let files: Vec<String> = snapshot(dst)
        .into_iter()
        .filter(|(_, node)| matches!(node, Node::File { .. }))
        .map(|(path, _)| path)
        .collect();
    if files.is_empty() {
        return false;
    }
    let abs = dst.join(&files[pick % files.len()]);
    let mut bytes = fs::read(&abs).unwrap();
    match how {
        0 if !bytes.is_empty() => {
            let at = pick % bytes.len();
            bytes[at] ^= 0x01;
        }
        1 if !bytes.is_empty() => bytes.truncate(bytes.len() / 2),
        2 => {
            fs::remove_file(&abs).unwrap();
            return true;
        }
        _ => bytes.push(b'!'),
    }
    // Through the filesystem, as real corruption by a writer would: the mtime moves.
    fs::write(&abs, bytes).unwrap();
    true
}

/// `tree` without the refused paths and what is under them.
fn without(tree: &BTreeMap<String, Node>, refused: &BTreeSet<String>) -> BTreeMap<String, Node> {
    tree.iter()
        .filter(|(path, _)| {
            !refused
                .iter()
                .any(|r| *path == r || path.starts_with(&format!("{r}/")))
        })
        .map(|(path, node)| (path.clone(), node.clone()))
        .collect()
}

fn refused_paths(report: &SyncReport) -> BTreeSet<String> {
    report.refused.iter().map(|r| r.path.clone()).collect()
}

/// Syncs and checks the outcome against the source.
fn sync_and_check(src: &Path, dst: &Path, max_deletions: u64) -> Result<(), TestCaseError> {
    let replicator = local(
        src,
        dst,
        FileSyncConfig {
            max_deletions,
            ..config()
        },
    );
    let before = snapshot(dst);
    let report = replicator.sync_blocking().unwrap();
    // Empty as far as syncing goes: refused links (a loop, say) do not count.
    let unsyncable: BTreeSet<String> = report
        .refused
        .iter()
        .filter(|r| r.reason != RefusalReason::NeedsDeletion)
        .map(|r| r.path.clone())
        .collect();
    let source_empty = without(&snapshot(src), &unsyncable).is_empty();
    prop_assert!(report.failed.is_empty(), "{report:?}");
    let src_root = fs::canonicalize(src).unwrap();
    for refused in &report.refused {
        // The kernel is the oracle: a link refused as escaping must not resolve inside the
        // source (links made by the edits leave the tree only when a rename moved them up), a
        // looping one must not resolve at all. A directory in the way of a file needs the
        // deletions that may have been held back.
        let resolved = fs::canonicalize(src.join(&refused.path));
        match refused.reason {
            RefusalReason::SymlinkEscapes { .. } => prop_assert!(
                resolved
                    .as_ref()
                    .map_or(true, |real| !real.starts_with(&src_root)),
                "{refused:?} resolves to {resolved:?}"
            ),
            RefusalReason::SymlinkLoop { .. } => {
                prop_assert!(resolved.is_err(), "{refused:?} resolves to {resolved:?}");
            }
            RefusalReason::NeedsDeletion => {}
            ref other => prop_assert!(false, "unexpected refusal {other:?}"),
        }
    }
    // No link on the target resolves outside it.
    let dst_root = fs::canonicalize(dst).unwrap();
    for (path, node) in snapshot(dst) {
        if let (Node::Link(_), Ok(real)) = (&node, fs::canonicalize(dst.join(&path))) {
            prop_assert!(real.starts_with(&dst_root), "{path} -> {}", real.display());
        }
    }
    let refused = refused_paths(&report);
    match &report.deletions_refused {
        None => {
            prop_assert_eq!(
                without(&snapshot(dst), &refused),
                without(&snapshot(src), &refused)
            );
        }
        Some(held) => {
            prop_assert_eq!(report.deleted, 0);
            match held.reason {
                DeletionRefusal::EmptySource => {
                    prop_assert!(source_empty);
                    // Nothing at all changed on the target.
                    prop_assert_eq!(&snapshot(dst), &before);
                }
                DeletionRefusal::OverCap { max } => {
                    prop_assert_eq!(max, max_deletions);
                    prop_assert!(held.pending > max_deletions);
                    prop_assert!(!source_empty);
                }
                ref other => prop_assert!(false, "unexpected refusal {other:?}"),
            }
            // Everything the source has is there (bar entries blocked by a directory that
            // could not be deleted) ...
            let target = snapshot(dst);
            for (path, node) in without(&snapshot(src), &refused) {
                prop_assert_eq!(target.get(&path), Some(&node), "{}", path);
            }
            // ... and a run allowed to delete finishes the job.
            let unlimited = local(
                src,
                dst,
                FileSyncConfig {
                    max_deletions: u64::MAX,
                    allow_empty_source: true,
                    ..config()
                },
            );
            let report = unlimited.sync_blocking().unwrap();
            prop_assert!(report.failed.is_empty(), "{report:?}");
            prop_assert!(report.deletions_refused.is_none(), "{report:?}");
            let refused = refused_paths(&report);
            prop_assert_eq!(
                without(&snapshot(dst), &refused),
                without(&snapshot(src), &refused)
            );
        }
    }
    // The target is what the manifest says, except where the source's entry was refused:
    // whatever is there was kept as found (possibly damaged), and verification says so.
    let verified = replicator.verify_target_blocking().unwrap();
    let refused = refused_paths(&replicator.sync_blocking().unwrap());
    let inside = |path: &String| {
        refused
            .iter()
            .any(|r| path == r || path.starts_with(&format!("{r}/")))
    };
    prop_assert!(verified.manifest_problem.is_none() && verified.failed.is_empty());
    prop_assert!(verified.missing.iter().all(inside), "{verified:?}");
    prop_assert!(verified.extra.iter().all(inside), "{verified:?}");
    prop_assert!(
        verified.modified.iter().all(|m| inside(&m.path)),
        "{verified:?}"
    );
    Ok(())
}

proptest! {
    // 64 cases by default (about a second); PROPTEST_CASES=3000 for a longer hunt.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn target_follows_the_source_through_any_edits(
        ops in prop::collection::vec(op(), 1..40),
        max_deletions in 3..40u64,
    ) {
        let paths = universe();
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        for (serial, op) in ops.iter().chain([&Op::Sync]).enumerate() {
            match *op {
                Op::Sync => sync_and_check(src.path(), dst.path(), max_deletions)?,
                Op::CorruptTarget { pick, how } => {
                    let verified_before = local(src.path(), dst.path(), config())
                        .verify_target_blocking()
                        .unwrap();
                    if corrupt(dst.path(), pick, how, serial) && verified_before.is_clean() {
                        let found = local(src.path(), dst.path(), config())
                            .verify_target_blocking()
                            .unwrap();
                        prop_assert!(!found.is_clean(), "corruption not found: {op:?}");
                    }
                }
                ref edit => apply(src.path(), edit, &paths),
            }
        }
    }
}

#[test]
fn relative_links_stay_inside() {
    assert_eq!(relative_link("a", "b"), "b");
    assert_eq!(relative_link("a/b", "a"), ".");
    assert_eq!(relative_link("a/b/c", "b/a"), "../../b/a");
    assert_eq!(relative_link("a/b/c", "a/c/a"), "../c/a");
}
