//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ha_dr::{KeyRing, LocalStore, MasterKey, Repository};

/// A repository in a temp dir; keep the guard alive.
pub fn repo(key: u8) -> (Repository, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path().join("store")).unwrap();
    (Repository::new(store, ring(key)), dir)
}

pub fn ring(key: u8) -> KeyRing {
    KeyRing::new(MasterKey::from_bytes([key; 32]))
}

/// Deterministic incompressible bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A tree with nested dirs, text and binary files, an empty file, a symlink inside and one
/// pointing outside, odd modes and old mtimes.
pub fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("a/text.txt"), "hello\n".repeat(10_000)).unwrap();
    fs::write(root.join("a/b/noise.bin"), noise(300_000, 1)).unwrap();
    fs::write(root.join("a/b/c/empty"), b"").unwrap();
    fs::write(root.join("script.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("script.sh"), fs::Permissions::from_mode(0o751)).unwrap();
    fs::set_permissions(
        root.join("a/b/noise.bin"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::symlink("b/noise.bin", root.join("a/link-in")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("link-out")).unwrap();
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    for file in ["a/text.txt", "a/b/noise.bin", "script.sh"] {
        fs::File::options()
            .write(true)
            .open(root.join(file))
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    fs::set_permissions(root.join("a/b/c"), fs::Permissions::from_mode(0o710)).unwrap();
    fs::File::open(root.join("a/b/c"))
        .unwrap()
        .set_modified(old)
        .unwrap();
}

/// Every entry under `root`: (relative path, kind, mode, mtime (files/dirs), content or link).
pub fn describe_tree(root: &Path) -> Vec<(PathBuf, String, u32, u64, String)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(root.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            let rel = rel.join(name);
            let path = root.join(&rel);
            let meta = fs::symlink_metadata(&path).unwrap();
            let mtime = meta
                .modified()
                .unwrap()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                out.push((rel, "link".into(), 0, 0, target.display().to_string()));
            } else if meta.is_dir() {
                out.push((rel.clone(), "dir".into(), mode, mtime, String::new()));
                stack.push(rel);
            } else {
                let data = fs::read(&path).unwrap();
                let sha = ring::digest::digest(&ring::digest::SHA256, &data);
                out.push((rel, "file".into(), mode, mtime, hex::encode(sha.as_ref())));
            }
        }
    }
    out.sort();
    out
}

/// The names in `dir`.
pub fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
