//! `cargo bench -p ha-dr --bench pipeline`: backup, verify and restore throughput and peak
//! RSS on 1 GiB of mixed data (half text-like, half random), next to restic on the same data
//! in the same run. Prints `name value unit` lines.
//!
//! `HA_DR_BENCH_MB` changes the data size (default 1024), `HA_DR_BENCH_ZSTD_WORKERS` the zstd
//! worker threads (default: one per core). restic must be installed
//! (`apt-get install -y restic`); the bench fails, saying so, when it is not.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use ha_dr::{KeyRing, LocalStore, MasterKey, Repository, RestoreTarget, Source};

mod common;
use common::{disk_write_floor, which};

const FILE_MB: usize = 16;

fn main() {
    let total_mb: usize = std::env::var("HA_DR_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let restic = which("restic").unwrap_or_else(|| {
        panic!("restic is not installed: the bench compares against it (apt-get install -y restic)")
    });
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    generate(&src, total_mb);
    let bytes = (total_mb * (1 << 20)) as f64;
    let mb = |secs: f64| bytes / 1e6 / secs;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = LocalStore::open(work.path().join("store")).unwrap();
    let mut repo = Repository::new(store, KeyRing::new(MasterKey::from_bytes([7; 32])));
    if let Some(workers) = std::env::var("HA_DR_BENCH_ZSTD_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        repo = repo.zstd_workers(workers);
    }
    let (backup_s, verify_s, restore_s, stored) = runtime.block_on(async {
        let t = Instant::now();
        let m = repo.backup(&Source::dir(&src), &[]).await.unwrap();
        let backup_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        repo.verify(&m.id).await.unwrap();
        let verify_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let target = RestoreTarget::Path(work.path().join("restored"));
        repo.restore(&m.id, &target, false).await.unwrap();
        (
            backup_s,
            verify_s,
            t.elapsed().as_secs_f64(),
            m.stored_bytes,
        )
    });
    let peak_rss_mb = peak_rss_kib() as f64 / 1024.0;
    fs::remove_dir_all(work.path().join("restored")).unwrap();
    // The disk's own time to make the restored bytes durable: neither tool can beat it.
    let floor_s = disk_write_floor(&work.path().join("floor"), bytes as u64).as_secs_f64();

    let repo_dir = work.path().join("restic-repo");
    let restic_cmd = |args: &[&str]| {
        let out = Command::new(&restic)
            .args(args)
            .arg("--repo")
            .arg(&repo_dir)
            .env("RESTIC_PASSWORD", "bench")
            .env("RESTIC_CACHE_DIR", work.path().join("restic-cache"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "restic {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    restic_cmd(&["init"]);
    let t = Instant::now();
    restic_cmd(&["backup", "--quiet", src.to_str().unwrap()]);
    let restic_backup_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let target = work.path().join("restic-restored");
    restic_cmd(&[
        "restore",
        "latest",
        "--quiet",
        "--target",
        target.to_str().unwrap(),
    ]);
    let restic_restore_s = t.elapsed().as_secs_f64();

    let lines = [
        ("data_mb", bytes / 1e6, "MB"),
        ("stored_mb", stored as f64 / 1e6, "MB"),
        ("backup_mb_s", mb(backup_s), "MB/s"),
        ("verify_mb_s", mb(verify_s), "MB/s"),
        ("restore_mb_s", mb(restore_s), "MB/s"),
        ("peak_rss_mb", peak_rss_mb, "MiB"),
        ("restic_backup_mb_s", mb(restic_backup_s), "MB/s"),
        ("restic_restore_mb_s", mb(restic_restore_s), "MB/s"),
        ("backup_vs_restic", restic_backup_s / backup_s, "x"),
        ("restore_vs_restic", restic_restore_s / restore_s, "x"),
        ("disk_write_floor_mb_s", mb(floor_s), "MB/s"),
        // A 2x target is reachable only if restic takes at least twice the floor.
        (
            "restore_2x_restic_over_disk_floor",
            restic_restore_s / 2.0 / floor_s,
            "x",
        ),
    ];
    for (name, value, unit) in lines {
        println!("{name} {value:.2} {unit}");
    }
}

/// `total_mb` of data in 16 MiB files: even files text-like, odd files random.
fn generate(dir: &Path, total_mb: usize) {
    fs::create_dir_all(dir).unwrap();
    const WORDS: &[&str] = &[
        "replica",
        "primary",
        "lease",
        "token",
        "backup",
        "restore",
        "segment",
        "the",
        "of",
        "health",
        "timeout",
        "2026-01-02T03:04:05Z",
        "INFO",
        "WARN",
        "connection",
        "node-7",
        "latency_ms=",
        "42",
        "\n",
        "checkpoint",
        "wal",
        "fsync",
        "ok",
        "error",
        "retry",
    ];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..total_mb.div_ceil(FILE_MB) {
        let mut file =
            std::io::BufWriter::new(fs::File::create(dir.join(format!("f{i:04}"))).unwrap());
        let mut written = 0usize;
        let target = FILE_MB << 20;
        let mut buf = Vec::with_capacity(1 << 20);
        while written < target {
            buf.clear();
            if i % 2 == 0 {
                while buf.len() < (1 << 20) {
                    let r = next();
                    buf.extend_from_slice(WORDS[(r % WORDS.len() as u64) as usize].as_bytes());
                    buf.push(b' ');
                    if r & 0xF00 == 0 {
                        buf.extend_from_slice(format!("{}", r >> 40).as_bytes());
                    }
                }
            } else {
                while buf.len() < (1 << 20) {
                    buf.extend_from_slice(&next().to_le_bytes());
                }
            }
            let take = buf.len().min(target - written);
            file.write_all(&buf[..take]).unwrap();
            written += take;
        }
        file.flush().unwrap();
    }
}

fn peak_rss_kib() -> u64 {
    fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
