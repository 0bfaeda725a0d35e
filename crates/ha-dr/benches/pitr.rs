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
//! Then, side by side with pgBackRest on one cluster loaded by `pgbench -i`: the base
//! backup, the restore to a time (until the server is out of recovery), and the recovery
//! point lost when the primary's data directory vanishes, with `archive_timeout = 60s`
//! alone (`rpo_archive_s`) and with `ha-dr wal-stream` (`rpo_stream_s`).
//!
//! `HA_DR_BENCH_SEGMENTS` sets how many segments are timed (default 12),
//! `HA_DR_BENCH_WAL_ZSTD_LEVEL` the zstd level of both tools' segment pushes (default 3),
//! `HA_DR_BENCH_SCALE` the pgbench scale (default 68: about 1 GiB),
//! `HA_DR_BENCH_RPO_WRITE_S` how long commits are written before the kill (default 15).
//! pgBackRest must be installed (`apt-get install -y pgbackrest`); the bench fails, saying
//! so, when it is not.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ha_testkit::PostgresServer;
use ha_testkit::postgres::{hand_to_server_user, run_as_server_user};

mod common;
use common::{dir_bytes, disk_write_floor, which};

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

fn p50_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
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
    // One zstd level for both tools' segment pushes (default 3).
    let level: i32 = std::env::var("HA_DR_BENCH_WAL_ZSTD_LEVEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let level_arg = level.to_string();
    println!("wal_push_zstd_level {level} level");
    // Ours as installed (zstd workers: one per core) and on one thread (`--zstd-workers
    // 0`, into a store of its own: a second push of a segment is a no-op).
    let store_1t = work.path().join("ha-dr-store-1t");
    let push_into = |store: &Path, workers: Option<&str>, segment: &Path| {
        let mut args = vec![
            "wal-push",
            "--store",
            s(store),
            "--key-file",
            s(&key),
            "--zstd-level",
            &level_arg,
        ];
        if let Some(workers) = workers {
            args.extend_from_slice(&["--zstd-workers", workers]);
        }
        args.push(s(segment));
        run(BIN, &args).1
    };
    let push = |segment: &Path| push_into(&store, None, segment);
    let push_1t = |segment: &Path| push_into(&store_1t, Some("0"), segment);
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
             compress-level={level}\narchive-async=n\nprocess-max=1\nlog-level-console=warn\n\
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
    push_1t(&segments[0]);
    archive_push(&segments[0]);
    let (mut ours, mut ours_1t, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    for segment in &segments[1..] {
        ours.push(push(segment));
        ours_1t.push(push_1t(segment));
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
    let (ours_p50, ours_1t_p50, theirs_p50) = (p50_ms(ours), p50_ms(ours_1t), p50_ms(theirs));
    let (ours_get_p50, theirs_get_p50) = (p50_ms(ours_get), p50_ms(theirs_get));
    println!("wal_segments_timed {} count", segments.len() - 1);
    println!("wal_push_ms_p50 {ours_p50:.1} ms");
    println!("pgbackrest_archive_push_ms_p50 {theirs_p50:.1} ms");
    println!(
        "wal_push_vs_pgbackrest_ratio {:.2} x",
        ours_p50 / theirs_p50
    );
    println!(
        "wal_push_speedup_vs_pgbackrest {:.2} x",
        theirs_p50 / ours_p50
    );
    println!("wal_push_1t_ms_p50 {ours_1t_p50:.1} ms");
    println!(
        "wal_push_1t_speedup_vs_pgbackrest {:.2} x",
        theirs_p50 / ours_1t_p50
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

    base_backup_and_restore_to_time(&runtime, work.path(), &pgbackrest);
    let rpo_archive = runtime.block_on(rpo(work.path(), false));
    println!("rpo_archive_s {rpo_archive:.3} s");
    let rpo_stream = runtime.block_on(rpo(work.path(), true));
    println!("rpo_stream_s {rpo_stream:.3} s");
}

/// The archive_command of a primary that archives into both ha-dr and pgBackRest.
fn both_archive(store: &Path, key: &Path, pgbackrest: &str, conf: &Path, stanza: &str) -> String {
    format!(
        "'{BIN}' wal-push --store '{}' --key-file '{}' %p && '{pgbackrest}' --config='{}' \
         --stanza={stanza} archive-push %p",
        s(store),
        s(key),
        s(conf)
    )
}

/// Polls `done` until it holds (bounded).
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 300 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether pgBackRest's archive `dir` holds segment `name` (pushed: renamed from its
/// temporary name into `<name>-<sha1>.zst`).
fn holds(dir: &Path, name: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.filter_map(|e| e.ok()).any(|e| {
        let file = e.file_name().to_string_lossy().into_owned();
        (file.starts_with(name) && file.ends_with(".zst"))
            || (e.file_type().is_ok_and(|t| t.is_dir()) && holds(&e.path(), name))
    })
}

/// Starts PostgreSQL on a restored data directory and waits until it is out of recovery.
async fn start_recovered(dir: &Path, what: &str, archives: &[&Path]) -> PostgresServer {
    let pg = match PostgresServer::builder().start_on(dir).await {
        Ok(pg) => pg,
        Err(e) => {
            let mut listing = Vec::new();
            for archive in archives {
                list_files(archive, &mut listing);
            }
            listing.sort();
            panic!("{what}: the restored server failed: {e}\narchives: {listing:#?}");
        }
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while !matches!(pg.is_in_recovery().await, Ok(false)) {
        assert!(
            Instant::now() < deadline,
            "recovery did not finish:\n{}",
            pg.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pg
}

fn list_files(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
    {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            list_files(&entry.path(), out);
        } else {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
}

/// `archive_mode = off` for a restored copy, so that it does not archive into the stores
/// the primary used (the same for both tools; outside the restore commands themselves).
fn no_archiving(dir: &Path) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("postgresql.auto.conf"))
        .unwrap();
    file.write_all(b"\narchive_mode = 'off'\n").unwrap();
}

/// `base_backup_s` and `restore_to_time_s` for ha-dr and pgBackRest on one cluster loaded
/// by `pgbench -i -s HA_DR_BENCH_SCALE` (default 68: about 1 GiB). Both archive every
/// segment (one archive_command runs both), both compress with zstd level 3 on two
/// threads (ha-dr's pipeline default; pgBackRest `process-max=2`), both encrypt, both
/// take the backup from a fast checkpoint. A restore to a time counts until the server
/// started on the restored directory is out of recovery, and must hold exactly the rows
/// committed before the target.
fn base_backup_and_restore_to_time(
    runtime: &tokio::runtime::Runtime,
    work: &Path,
    pgbackrest: &str,
) {
    let scale: u32 = std::env::var("HA_DR_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(68);
    let work = work.join("base");
    std::fs::create_dir(&work).unwrap();
    hand_to_server_user(&work).unwrap();
    let store = work.join("ha-dr-store");
    let key = work.join("ha-dr.key");
    run(BIN, &["keygen", "--out", s(&key)]);
    let conf = work.join("pgbackrest.conf");
    let repo = work.join("pgbackrest-repo");
    let bin = ha_testkit::binaries::postgres_bin_dir().unwrap();
    let pg = runtime.block_on(async {
        PostgresServer::builder()
            .archive_command(both_archive(&store, &key, pgbackrest, &conf, "base"))
            .replication_user("replicator")
            .start()
            .await
            .unwrap()
    });
    let data_dir = pg.data_dir().to_path_buf();
    std::fs::write(
        &conf,
        format!(
            "[global]\nrepo1-path={}\nrepo1-cipher-type=aes-256-cbc\n\
             repo1-cipher-pass=benchmark-passphrase-0123456789\ncompress-type=zst\n\
             compress-level=3\narchive-async=n\nprocess-max=2\nstart-fast=y\n\
             repo1-retention-full=9\nlog-level-console=warn\nlog-level-file=off\n\
             lock-path={}\nspool-path={}\n\
             [base]\npg1-path={}\npg1-port={}\npg1-socket-path={}\npg1-user=postgres\n",
            s(&repo),
            s(&work.join("pgbackrest-lock")),
            s(&work.join("pgbackrest-spool")),
            s(&data_dir),
            pg.port(),
            s(data_dir.parent().unwrap())
        ),
    )
    .unwrap();
    hand_to_server_user(&conf).unwrap();
    let config_arg = format!("--config={}", s(&conf));
    run(pgbackrest, &[&config_arg, "--stanza=base", "stanza-create"]);
    let port = pg.port().to_string();
    let (_, load) = run(
        s(&bin.join("pgbench")),
        &[
            "-i",
            "-q",
            "-s",
            &scale.to_string(),
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "postgres",
        ],
    );
    let size: i64 = runtime
        .block_on(pg.query_scalar("SELECT pg_database_size('postgres')"))
        .unwrap();
    println!("bench_scale {scale} pgbench");
    println!("bench_database_bytes {size} bytes");
    println!("bench_load_s {:.1} s", load.as_secs_f64());

    let url = format!("postgres://replicator@127.0.0.1:{port}/postgres");
    let repo_args = ["--store", s(&store), "--key-file", s(&key)];
    let mut backup = vec!["backup", "--pg-bin", s(&bin), "--pg-base", &url];
    backup.extend_from_slice(&repo_args);
    let (out, ours_backup) = run(BIN, &backup);
    let base = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (_, theirs_backup) = run(
        pgbackrest,
        &[&config_arg, "--stanza=base", "--type=full", "backup"],
    );
    println!("base_backup_s {:.2} s", ours_backup.as_secs_f64());
    println!(
        "pgbackrest_base_backup_s {:.2} s",
        theirs_backup.as_secs_f64()
    );
    println!(
        "base_backup_vs_pgbackrest_ratio {:.2} x",
        ours_backup.as_secs_f64() / theirs_backup.as_secs_f64()
    );
    // The base backup's own objects (the store holds the archived WAL too).
    let base_bytes: u64 = ["data", "manifest"]
        .iter()
        .map(|ext| {
            std::fs::metadata(store.join(format!("{base}.{ext}")))
                .unwrap()
                .len()
        })
        .sum();
    println!("base_backup_stored_bytes {base_bytes} bytes");
    println!(
        "pgbackrest_base_backup_stored_bytes {} bytes",
        dir_bytes(&repo.join("backup"))
    );

    // Commits after both backups; T between the two batches; a segment after T archived
    // by both. pgBackRest records the backup's stop time in whole seconds and picks a set
    // that stopped before T: T is at least 1.1 s after its backup ended.
    let backups_ended = Instant::now();
    let target: String = runtime.block_on(async {
        wait_until("1.1 s past the backups", || {
            backups_ended.elapsed() >= Duration::from_millis(1100)
        })
        .await;
        pg.execute("CREATE TABLE marks (id bigint PRIMARY KEY); INSERT INTO marks SELECT generate_series(1, 1000)")
            .await
            .unwrap();
        let t: String = pg
            .query_scalar("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
            .await
            .unwrap();
        pg.execute("INSERT INTO marks SELECT generate_series(1001, 2000)").await.unwrap();
        let name: String = pg
            .query_scalar("SELECT pg_walfile_name(pg_switch_wal())")
            .await
            .unwrap();
        wait_until("the segment after T archived by both", || {
            store.join(format!("wal-{name}.manifest")).exists()
                && holds(&repo.join("archive"), &name)
        })
        .await;
        t
    });
    drop(pg);

    let ours_dir = work.join("restored-ha-dr");
    let theirs_dir = work.join("restored-pgbackrest");
    let check = |pg: &PostgresServer| {
        let n: i64 = runtime
            .block_on(pg.query_scalar("SELECT count(*) FROM marks"))
            .unwrap();
        assert_eq!(n, 1000, "exactly the rows committed before T");
    };
    let started = Instant::now();
    let mut restore = vec![
        "restore",
        "--pg-base",
        &base,
        "--to",
        s(&ours_dir),
        "--target-time",
        &target,
    ];
    restore.extend_from_slice(&repo_args);
    let (_, ours_files) = run(BIN, &restore);
    no_archiving(&ours_dir);
    let ours_pg = runtime.block_on(start_recovered(
        &ours_dir,
        "ha-dr restore to time",
        &[&store],
    ));
    let ours_restore = started.elapsed();
    check(&ours_pg);
    // The restored directory's files (the server moved it into its own directory).
    let restored_bytes = dir_bytes(ours_pg.data_dir());
    drop(ours_pg);

    std::fs::create_dir(&theirs_dir).unwrap();
    std::fs::set_permissions(
        &theirs_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    hand_to_server_user(&theirs_dir).unwrap();
    let started = Instant::now();
    let (_, theirs_files) = run(
        pgbackrest,
        &[
            &config_arg,
            "--stanza=base",
            &format!("--pg1-path={}", s(&theirs_dir)),
            "--type=time",
            &format!("--target={target}"),
            "--target-action=promote",
            // The testkit starts the server on a moved copy: archive-get must find the data
            // directory where the server runs (its working directory), not where it was
            // restored.
            &format!(
                "--recovery-option=restore_command={pgbackrest} {config_arg} --stanza=base \
                 --pg1-path=\"$PWD\" archive-get %f \"%p\""
            ),
            "restore",
        ],
    );
    no_archiving(&theirs_dir);
    let theirs_pg = runtime.block_on(start_recovered(
        &theirs_dir,
        "pgbackrest restore to time",
        &[&repo.join("archive")],
    ));
    let theirs_restore = started.elapsed();
    check(&theirs_pg);
    drop(theirs_pg);
    // What writing the restored bytes costs this disk at all: the same number of bytes
    // written and fsynced in 1 MiB writes, by nothing but this process.
    let floor = disk_write_floor(&work.join("floor"), restored_bytes);
    println!("restored_bytes {restored_bytes} bytes");
    println!("disk_write_floor_s {:.2} s", floor.as_secs_f64());
    println!("restore_files_s {:.2} s", ours_files.as_secs_f64());
    println!(
        "pgbackrest_restore_files_s {:.2} s",
        theirs_files.as_secs_f64()
    );
    println!(
        "recovery_s {:.2} s",
        (ours_restore - ours_files).as_secs_f64()
    );
    println!(
        "pgbackrest_recovery_s {:.2} s",
        (theirs_restore - theirs_files).as_secs_f64()
    );
    println!("restore_to_time_s {:.2} s", ours_restore.as_secs_f64());
    println!(
        "pgbackrest_restore_to_time_s {:.2} s",
        theirs_restore.as_secs_f64()
    );
    println!(
        "restore_to_time_vs_pgbackrest_ratio {:.2} x",
        ours_restore.as_secs_f64() / theirs_restore.as_secs_f64()
    );
    println!(
        "restore_to_time_speedup_vs_pgbackrest {:.2} x",
        theirs_restore.as_secs_f64() / ours_restore.as_secs_f64()
    );
    // A 2x target is reachable only if half of pgBackRest's time is above the floor.
    println!(
        "restore_to_time_2x_target_over_disk_floor {:.2} x",
        theirs_restore.as_secs_f64() / 2.0 / floor.as_secs_f64()
    );
}

/// The recovery point lost when a primary's data directory vanishes: commits with their
/// server timestamps written continuously for `HA_DR_BENCH_RPO_WRITE_S` (default 15) after
/// a base backup, the primary SIGKILLed and its data directory deleted, `restore --latest`;
/// the newest acknowledged commit's time minus the newest recovered one's. The primary
/// archives with `archive_timeout = 60s`; `stream`: `ha-dr wal-stream` runs beside it too
/// (asynchronous: not a synchronous standby), stopped with SIGTERM after the kill (it
/// pushed what pg_receivewal had received when the server went away).
async fn rpo(work: &Path, stream: bool) -> f64 {
    let write_for = Duration::from_secs(
        std::env::var("HA_DR_BENCH_RPO_WRITE_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(15),
    );
    let work = work.join(if stream { "rpo-stream" } else { "rpo-archive" });
    std::fs::create_dir(&work).unwrap();
    hand_to_server_user(&work).unwrap();
    let store = work.join("store");
    let key = work.join("key");
    run(BIN, &["keygen", "--out", s(&key)]);
    let bin = ha_testkit::binaries::postgres_bin_dir().unwrap();
    let mut pg = PostgresServer::builder()
        .archive_command(format!(
            "'{BIN}' wal-push --store '{}' --key-file '{}' %p",
            s(&store),
            s(&key)
        ))
        .archive_timeout(Duration::from_secs(60))
        .replication_user("replicator")
        .start()
        .await
        .unwrap();
    pg.execute("CREATE TABLE w (id bigint PRIMARY KEY, at float8 NOT NULL)")
        .await
        .unwrap();
    let url = format!("postgres://replicator@127.0.0.1:{}/postgres", pg.port());
    let repo_args = ["--store", s(&store), "--key-file", s(&key)];
    let mut backup = vec!["backup", "--pg-bin", s(&bin), "--pg-base", &url];
    backup.extend_from_slice(&repo_args);
    let (out, _) = run(BIN, &backup);
    let base = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let mut streamer = stream.then(|| {
        let mut command = Command::new(BIN);
        command
            .arg("wal-stream")
            .args(repo_args)
            .args(["--pg-bin", s(&bin), "--url", &url])
            .args(["--spool", s(&work.join("spool"))])
            .env_remove("HA_DR_KEY")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        run_as_server_user(&mut command).unwrap();
        command.spawn().unwrap()
    });
    if stream {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n: i64 = pg
                .query_scalar("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
                .await
                .unwrap();
            if n > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "wal-stream never streamed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut conn = pg.connect().await.unwrap();
    let mut acked = Vec::new();
    let started = Instant::now();
    while started.elapsed() < write_for {
        let id = acked.len() as i64 + 1;
        let at: f64 = sqlx::query_scalar(
            "INSERT INTO w VALUES ($1, extract(epoch from clock_timestamp())) RETURNING at",
        )
        .bind(id)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        acked.push(at);
    }
    drop(conn);
    pg.kill().unwrap();
    std::fs::remove_dir_all(pg.data_dir()).unwrap();
    if let Some(child) = streamer.as_mut() {
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "wal-stream did not stop");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let dir = work.join("restored");
    let mut restore = vec!["restore", "--pg-base", &base, "--to", s(&dir), "--latest"];
    restore.extend_from_slice(&repo_args);
    run(BIN, &restore);
    no_archiving(&dir);
    let restored = start_recovered(&dir, "restore --latest", &[&store]).await;
    let newest: Option<i64> = restored
        .query_scalar("SELECT max(id) FROM w")
        .await
        .unwrap();
    let newest_acked = *acked.last().unwrap();
    let recovered_at = newest.map_or(0.0, |id| acked[(id - 1) as usize]);
    let kind = if stream { "stream" } else { "archive" };
    println!("rpo_{kind}_commits_acknowledged {} count", acked.len());
    println!("rpo_{kind}_commits_recovered {} count", newest.unwrap_or(0));
    // With nothing recovered, everything since the base backup is lost.
    if newest.is_none() {
        return newest_acked - acked[0];
    }
    newest_acked - recovered_at
}
