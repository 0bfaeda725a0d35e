//! `cargo bench -p ha-dr --bench pitr`: archiving real 16 MiB WAL segments, `ha-dr
//! wal-push` next to pgBackRest's `archive-push` in the same run, each as PostgreSQL runs
//! an `archive_command` (one process per segment, as the server's OS user), and fetching
//! them back (`wal-fetch`, `archive-get`). Prints `name value unit` lines.
//!
//! Comparable settings: zstd level 3 on one thread for both; encryption on for both
//! (AES-256-GCM for ha-dr, pgBackRest's `aes-256-cbc`); a local repository; pgBackRest
//! synchronous (`archive-async=n`). The segments come from a real PostgreSQL (ha-testkit)
//! that wrote rows of hex text, copied aside by a `cp` archive command.
//!
//! `HA_DR_BENCH_SEGMENTS` sets how many segments are timed (default 12). pgBackRest must be
//! installed (`apt-get install -y pgbackrest`); the bench fails, saying so, when it is not.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ha_testkit::PostgresServer;
use ha_testkit::postgres::{hand_to_server_user, run_as_server_user};

const BIN: &str = env!("CARGO_BIN_EXE_ha-dr");

fn run(program: &str, args: &[&str]) -> (Output, Duration) {
    let mut command = Command::new(program);
    command.args(args).env_remove("HA_DR_KEY");
    run_as_server_user(&mut command).unwrap();
    let started = Instant::now();
    let out = command.output().unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, took)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn p50_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

fn dir_bytes(dir: &Path) -> u64 {
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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn main() {
    let count: usize = std::env::var("HA_DR_BENCH_SEGMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let pgbackrest = which("pgbackrest").unwrap_or_else(|| {
        panic!(
            "pgbackrest is not installed: the bench compares against it \
             (apt-get install -y pgbackrest)"
        )
    });
    let pgbackrest = s(&pgbackrest).to_owned();
    let work = tempfile::tempdir().unwrap();
    hand_to_server_user(work.path()).unwrap();
    let segments_dir = work.path().join("segments");
    std::fs::create_dir(&segments_dir).unwrap();
    hand_to_server_user(&segments_dir).unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A real cluster writes the WAL; its archive command copies each finished segment aside.
    let pg = runtime.block_on(async {
        let pg = PostgresServer::builder()
            .archive_command(format!("cp %p '{}/%f'", s(&segments_dir)))
            .start()
            .await
            .unwrap();
        pg.execute("CREATE TABLE w (id bigint, payload text)")
            .await
            .unwrap();
        let segment_names = |dir: &Path| -> Vec<PathBuf> {
            let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().unwrap().len() == 24
                        && std::fs::metadata(p).is_ok_and(|m| m.len() == 16 << 20)
                })
                .collect();
            names.sort();
            names
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut next = 0i64;
        while segment_names(&segments_dir).len() < count + 1 {
            assert!(Instant::now() < deadline, "WAL not archived in time");
            pg.execute(&format!(
                "INSERT INTO w SELECT g, md5(g::text) || repeat(md5((g * 7)::text), 3) \
                 FROM generate_series({next}, {}) g",
                next + 99_999
            ))
            .await
            .unwrap();
            next += 100_000;
            pg.execute("SELECT pg_switch_wal()").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pg
    });
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&segments_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().unwrap().len() == 24)
        .collect();
    segments.sort();
    segments.truncate(count + 1);
    hand_to_server_user(&segments_dir).unwrap();

    // ha-dr: a key file and a store, as the archive_command would use them.
    let store = work.path().join("ha-dr-store");
    let key = work.path().join("ha-dr.key");
    run(BIN, &["keygen", "--out", s(&key)]);
    let push = |segment: &Path| {
        run(
            BIN,
            &[
                "wal-push",
                "--store",
                s(&store),
                "--key-file",
                s(&key),
                s(segment),
            ],
        )
        .1
    };
    // pgBackRest: a stanza on the same cluster (it checks the segments' system identifier).
    let conf = work.path().join("pgbackrest.conf");
    let data_dir = pg.data_dir().to_path_buf();
    let socket_dir = data_dir.parent().unwrap().to_path_buf();
    let repo = work.path().join("pgbackrest-repo");
    std::fs::write(
        &conf,
        format!(
            "[global]\nrepo1-path={}\nrepo1-cipher-type=aes-256-cbc\n\
             repo1-cipher-pass=benchmark-passphrase-0123456789\ncompress-type=zst\n\
             compress-level=3\narchive-async=n\nprocess-max=1\nlog-level-console=warn\n\
             log-level-file=off\nlock-path={}\nspool-path={}\n\
             [bench]\npg1-path={}\npg1-port={}\npg1-socket-path={}\npg1-user=postgres\n",
            s(&repo),
            s(&work.path().join("pgbackrest-lock")),
            s(&work.path().join("pgbackrest-spool")),
            s(&data_dir),
            pg.port(),
            s(&socket_dir)
        ),
    )
    .unwrap();
    hand_to_server_user(&conf).unwrap();
    let config_arg = format!("--config={}", s(&conf));
    run(
        &pgbackrest,
        &[
            &config_arg,
            "--stanza=bench",
            "--no-online",
            "stanza-create",
        ],
    );
    let archive_push = |segment: &Path| {
        run(
            &pgbackrest,
            &[&config_arg, "--stanza=bench", "archive-push", s(segment)],
        )
        .1
    };

    // The first segment warms both up (page cache, binaries); the rest are timed in turns.
    push(&segments[0]);
    archive_push(&segments[0]);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for segment in &segments[1..] {
        ours.push(push(segment));
        theirs.push(archive_push(segment));
    }

    // And back: what a restore_command costs per segment.
    let fetched = work.path().join("fetched");
    std::fs::create_dir(&fetched).unwrap();
    hand_to_server_user(&fetched).unwrap();
    let (mut ours_get, mut theirs_get) = (Vec::new(), Vec::new());
    for segment in &segments[1..] {
        let name = segment.file_name().unwrap().to_str().unwrap();
        let dest = fetched.join("RECOVERYXLOG");
        ours_get.push(
            run(
                BIN,
                &[
                    "wal-fetch",
                    "--store",
                    s(&store),
                    "--key-file",
                    s(&key),
                    name,
                    s(&dest),
                ],
            )
            .1,
        );
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(segment).unwrap()
        );
        std::fs::remove_file(&dest).unwrap();
        theirs_get.push(
            run(
                &pgbackrest,
                &[&config_arg, "--stanza=bench", "archive-get", name, s(&dest)],
            )
            .1,
        );
        std::fs::remove_file(&dest).unwrap();
    }
    drop(pg);

    let n = segments.len() as f64;
    let (ours_p50, theirs_p50) = (p50_ms(ours), p50_ms(theirs));
    let (ours_get_p50, theirs_get_p50) = (p50_ms(ours_get), p50_ms(theirs_get));
    println!("wal_segments_timed {} count", segments.len() - 1);
    println!("wal_push_ms_p50 {ours_p50:.1} ms");
    println!("pgbackrest_archive_push_ms_p50 {theirs_p50:.1} ms");
    println!(
        "wal_push_vs_pgbackrest_ratio {:.2} x",
        ours_p50 / theirs_p50
    );
    println!("wal_fetch_ms_p50 {ours_get_p50:.1} ms");
    println!("pgbackrest_archive_get_ms_p50 {theirs_get_p50:.1} ms");
    println!(
        "wal_fetch_vs_pgbackrest_ratio {:.2} x",
        ours_get_p50 / theirs_get_p50
    );
    println!(
        "wal_stored_bytes_per_segment {:.0} bytes",
        dir_bytes(&store) as f64 / n
    );
    println!(
        "pgbackrest_stored_bytes_per_segment {:.0} bytes",
        dir_bytes(&repo.join("archive")) as f64 / n
    );
}
