//! File sync benchmark: `FileReplicator` against Debian's `rsync` on the same generated tree,
//! in the same run. Prints `name value unit` lines:
//!
//! - `initial_sync_s`, `incremental_sync_s` (1 % of the files rewritten, half of them at the
//!   same size; the median of `HA_BENCH_ROUNDS` rounds, default 9, each changing another 1 %
//!   and synced by all three right after), `noop_sync_s` (nothing changed), `verify_s`
//!   (`verify_target`, every file re-hashed);
//! - `rsync_initial_s`, `rsync_incremental_s`, `rsync_noop_s` (`rsync -a`), and
//!   `rsync_checksum_initial_s`, `rsync_checksum_incremental_s` (`rsync -a --checksum`);
//! - ratios `incremental_vs_rsync`, `incremental_vs_rsync_checksum`, `initial_vs_rsync`
//!   (ours / theirs: below 1 is faster).
//!
//! The tree: 10,000 files, ~500 MiB of incompressible bytes, mixed sizes (90 % up to 32 KiB,
//! 9 % up to 1 MiB, 1 % up to 16 MiB, then scaled to the total), in 110 directories, all from
//! a fixed seed and dated in the past (like a checkout). Everything runs on a warm page cache.
//! Note that `FileReplicator` fsyncs every file it writes and rsync does not.
//!
//! `cargo bench -p ha-replication --bench filesync`; `HA_BENCH_FILES` and `HA_BENCH_MB` shrink
//! it for a quick run, `HA_BENCH_PARALLELISM` overrides the replicator's thread count. Needs
//! `rsync` on the PATH (`apt-get install -y rsync`); without it the bench exits with status 2.
#![allow(clippy::print_stdout, clippy::unwrap_used)] // a benchmark prints; setup failures panic

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use ha_replication::files::{FileReplicator, FileSyncConfig};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// SplitMix64: a small deterministic generator, good enough for sizes and filler bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Log-uniform in `[lo, hi)`.
    fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo.ln() + self.unit() * (hi.ln() - lo.ln())).exp()
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Relative paths and sizes of the tree, deterministic for a given count and total.
fn plan(files: u64, total_bytes: u64, rng: &mut Rng) -> Vec<(String, u64)> {
    let raw: Vec<f64> = (0..files)
        .map(|_| {
            let class = rng.unit();
            if class < 0.90 {
                rng.log_uniform(1024.0, 32.0 * 1024.0)
            } else if class < 0.99 {
                rng.log_uniform(32.0 * 1024.0, 1024.0 * 1024.0)
            } else {
                rng.log_uniform(1024.0 * 1024.0, 16.0 * 1024.0 * 1024.0)
            }
        })
        .collect();
    let scale = total_bytes as f64 / raw.iter().sum::<f64>();
    raw.iter()
        .enumerate()
        .map(|(i, size)| {
            let (top, sub) = (i % 10, (i / 10) % 10);
            (format!("d{top}/e{sub}/f{i:05}.bin"), (size * scale) as u64)
        })
        .collect()
}

fn write_file(path: &Path, size: u64, rng: &mut Rng, mtime: Option<SystemTime>) {
    let mut data = vec![0u8; size as usize];
    rng.fill(&mut data);
    fs::write(path, &data).unwrap();
    if let Some(mtime) = mtime {
        let file = fs::File::options().write(true).open(path).unwrap();
        file.set_modified(mtime).unwrap();
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed().as_secs_f64())
}

fn rsync(args: &[&str], src: &Path, dst: &Path) -> f64 {
    let (status, secs) = timed(|| {
        Command::new("rsync")
            .args(args)
            .arg(format!("{}/", src.display()))
            .arg(format!("{}/", dst.display()))
            .status()
            .unwrap()
    });
    assert!(status.success(), "rsync {args:?} failed: {status}");
    secs
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn line(name: &str, value: f64, unit: &str) {
    println!("{name} {value:.4} {unit}");
}

fn main() {
    if Command::new("rsync").arg("--version").output().is_err() {
        eprintln!(
            "filesync bench: `rsync` is not installed; it is the baseline this benchmark \
             compares with. Install it (Debian: `apt-get install -y rsync`) and run again."
        );
        std::process::exit(2);
    }
    let files = env("HA_BENCH_FILES", 10_000).max(1);
    let total = env("HA_BENCH_MB", 500) * 1024 * 1024;
    let work = tempfile::tempdir().unwrap();
    let root = |name: &str| -> PathBuf {
        let dir = work.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        dir
    };
    let (src, ours, plain, checksum) = (root("src"), root("ha"), root("rsync"), root("rsync-c"));

    let mut rng = Rng(0x5EED_F11E_5A4C);
    let layout = plan(files, total, &mut rng);
    let past = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    let (_, generate_s) = timed(|| {
        for (rel, size) in &layout {
            let path = src.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            write_file(&path, *size, &mut rng, Some(past));
        }
    });
    let bytes: u64 = layout.iter().map(|(_, size)| size).sum();
    line("files", files as f64, "count");
    line("tree_mib", bytes as f64 / (1024.0 * 1024.0), "MiB");
    line("generate_s", generate_s, "s");

    let mut config = FileSyncConfig::default();
    if let Some(threads) = std::env::var("HA_BENCH_PARALLELISM")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.parallelism = threads;
    }
    let replicator = FileReplicator::local(&src, &ours, config).unwrap();
    let (report, initial_s) = timed(|| replicator.sync_blocking().unwrap());
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.files_copied, files);
    let rsync_initial_s = rsync(&["-a"], &src, &plain);
    let rsync_checksum_initial_s = rsync(&["-a", "--checksum"], &src, &checksum);

    let (report, noop_s) = timed(|| replicator.sync_blocking().unwrap());
    assert_eq!(
        (report.files_copied, report.bytes_hashed),
        (0, 0),
        "{report:?}"
    );
    let rsync_noop_s = rsync(&["-a"], &src, &plain);

    // Rounds of 1 % of the files rewritten (a different 1 % each round; every other one at
    // the same size, so only content and mtime change, the rest 1 KiB longer), each synced by
    // both; the medians are reported, the load of a shared machine being what it is.
    let rounds = env("HA_BENCH_ROUNDS", 9).max(1) as usize;
    let (mut ours_s, mut plain_s, mut checksum_s) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let changed: Vec<&(String, u64)> = layout.iter().skip(round).step_by(100).collect();
        for (n, (rel, size)) in changed.iter().enumerate() {
            let size = if n % 2 == 0 { *size } else { size + 1024 };
            write_file(&src.join(rel), size, &mut rng, None);
        }
        let (report, secs) = timed(|| replicator.sync_blocking().unwrap());
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.files_copied, changed.len() as u64, "{report:?}");
        ours_s.push(secs);
        plain_s.push(rsync(&["-a"], &src, &plain));
        checksum_s.push(rsync(&["-a", "--checksum"], &src, &checksum));
    }
    let incremental_s = median(&mut ours_s);
    let rsync_incremental_s = median(&mut plain_s);
    let rsync_checksum_incremental_s = median(&mut checksum_s);
    let (verified, verify_s) = timed(|| replicator.verify_target_blocking().unwrap());
    assert!(verified.is_clean(), "{verified:?}");

    line("initial_sync_s", initial_s, "s");
    line("incremental_sync_s", incremental_s, "s");
    line("noop_sync_s", noop_s, "s");
    line("verify_s", verify_s, "s");
    line("rsync_initial_s", rsync_initial_s, "s");
    line("rsync_incremental_s", rsync_incremental_s, "s");
    line("rsync_noop_s", rsync_noop_s, "s");
    line("rsync_checksum_initial_s", rsync_checksum_initial_s, "s");
    line(
        "rsync_checksum_incremental_s",
        rsync_checksum_incremental_s,
        "s",
    );
    line(
        "incremental_vs_rsync",
        incremental_s / rsync_incremental_s,
        "ratio",
    );
    line(
        "incremental_vs_rsync_checksum",
        incremental_s / rsync_checksum_incremental_s,
        "ratio",
    );
    line("initial_vs_rsync", initial_s / rsync_initial_s, "ratio");
}
