//! What both benches share: finding a reference tool, sizing a tree, and the disk's own
//! floor for making bytes durable (a restore cannot beat it).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `program` on `PATH`, if it is there.
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Bytes of the files under `dir`.
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// Writes `bytes` of incompressible data to a new file under `dir` in 1 MiB writes, fsyncs
/// it and `dir`, and removes it: how long this disk takes to make that much durable, which
/// no restore of that many bytes can beat.
pub(crate) fn disk_write_floor(dir: &Path, bytes: u64) -> Duration {
    std::fs::create_dir_all(dir).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in chunk.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let path = dir.join("floor");
    // Whatever earlier steps left to write back would be timed too.
    let synced = std::process::Command::new("sync").status().unwrap();
    assert!(synced.success(), "sync failed");
    let started = Instant::now();
    let mut file = std::fs::File::create(&path).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    file.sync_all().unwrap();
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
    let took = started.elapsed();
    std::fs::remove_file(&path).unwrap();
    took
}
