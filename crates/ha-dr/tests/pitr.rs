//! Point-in-time recovery on real PostgreSQL (ha-testkit): the `ha-dr` binary as the
//! primary's `archive_command`, `backup --pg-base` through `pg_basebackup`, `restore --pg-base`
//! to a time and to the latest commit (with `wal-fetch` as `restore_command`), across a
//! timeline switch; a gap in the archive named by `verify --chain` and refused by restore; a
//! tampered segment refused by `wal-fetch`.
//!
//! PostgreSQL runs as the `postgres` OS user when the tests run as root, and so does its
//! `archive_command`: the archive directory, the key and every `ha-dr` run here belong to
//! that user, as they would in production.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ha_testkit::PostgresServer;
use ha_testkit::postgres::{hand_to_server_user, run_as_server_user};

const BIN: &str = env!("CARGO_BIN_EXE_ha-dr");
/// Bound on waiting for a segment to be archived, and for a recovery to finish.
const WAIT: Duration = Duration::from_secs(60);

/// Runs `ha-dr` as the server's OS user.
fn ha_dr(args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command.args(args).env_remove("HA_DR_KEY");
    run_as_server_user(&mut command).unwrap();
    command.output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = ha_dr(args);
    assert!(
        out.status.success(),
        "ha-dr {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A store and a key the server's OS user owns.
struct Archive {
    dir: tempfile::TempDir,
    store: PathBuf,
    key: PathBuf,
}

impl Archive {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        hand_to_server_user(dir.path()).unwrap();
        let (store, key) = (dir.path().join("store"), dir.path().join("key"));
        ok(&["keygen", "--out", s(&key)]);
        Self { dir, store, key }
    }

    fn repo_args(&self) -> Vec<String> {
        vec![
            "--store".into(),
            s(&self.store).into(),
            "--key-file".into(),
            s(&self.key).into(),
        ]
    }

    fn run(&self, command: &str, rest: &[&str]) -> Output {
        let repo = self.repo_args();
        let mut args = vec![command];
        args.extend(repo.iter().map(String::as_str));
        args.extend_from_slice(rest);
        ha_dr(&args)
    }

    fn ok(&self, command: &str, rest: &[&str]) -> String {
        let out = self.run(command, rest);
        assert!(
            out.status.success(),
            "ha-dr {command} {rest:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A primary archiving into this store, with a `replicator` role for `pg_basebackup`.
    async fn primary(&self) -> PostgresServer {
        PostgresServer::builder()
            .archive_command(format!(
                "'{BIN}' wal-push --store '{}' --key-file '{}' %p",
                s(&self.store),
                s(&self.key)
            ))
            .archive_timeout(Duration::from_secs(1))
            .replication_user("replicator")
            .start()
            .await
            .unwrap()
    }

    /// `backup --pg-base` of `pg` as the `replicator` role; the new backup's id.
    fn base_backup(&self, pg: &PostgresServer) -> String {
        let bin = ha_testkit::binaries::postgres_bin_dir().unwrap();
        let url = format!("postgres://replicator@127.0.0.1:{}/postgres", pg.port());
        let id = self.ok("backup", &["--pg-bin", s(&bin), "--pg-base", &url]);
        id.trim().to_owned()
    }

    /// The ids of the base backups in the store, oldest first (as `list` orders them).
    fn base_backup_ids(&self) -> Vec<String> {
        let listed = ok(&["list", "--store", s(&self.store)]);
        listed
            .lines()
            .filter_map(|line| line.split('\t').next())
            .filter(|id| id.starts_with("pg_base-"))
            .map(str::to_owned)
            .collect()
    }

    fn archived(&self, name: &str) -> bool {
        self.store.join(format!("wal-{name}.manifest")).exists()
    }

    /// Switches `pg` to a new segment and waits until the one just finished is archived.
    async fn switch_and_wait(&self, pg: &PostgresServer) -> String {
        let name: String = pg
            .query_scalar("SELECT pg_walfile_name(pg_switch_wal())")
            .await
            .unwrap();
        let started = Instant::now();
        while !self.archived(&name) {
            if started.elapsed() > WAIT {
                let status: String = pg
                    .query_scalar("SELECT row(a.*)::text FROM pg_stat_archiver a")
                    .await
                    .unwrap_or_default();
                panic!(
                    "{name} not archived after {WAIT:?}: {status}\n{}",
                    pg.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        name
    }

    /// `restore --pg-base` into a new directory beside the store; the directory.
    fn restore(&self, base: &str, to: &str, target: &[&str]) -> PathBuf {
        let dir = self.dir.path().join(to);
        let mut rest = vec!["--pg-base", base, "--to", s(&dir)];
        rest.extend_from_slice(target);
        self.ok("restore", &rest);
        dir
    }
}

/// Starts PostgreSQL on a restored data directory and waits until recovery ended and the
/// server promoted itself.
async fn start_restored(dir: &Path) -> PostgresServer {
    let pg = PostgresServer::builder().start_on(dir).await.unwrap();
    let started = Instant::now();
    loop {
        if let Ok(false) = pg.is_in_recovery().await {
            return pg;
        }
        assert!(
            started.elapsed() < WAIT,
            "recovery did not finish in {WAIT:?}:\n{}",
            pg.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn rows(pg: &PostgresServer, table: &str) -> Vec<i64> {
    let mut conn = pg.connect().await.unwrap();
    let ids: Vec<i64> = sqlx::query_scalar(&format!("SELECT id FROM {table} ORDER BY id"))
        .fetch_all(&mut conn)
        .await
        .unwrap();
    ids
}

fn range(from: i64, to: i64) -> Vec<i64> {
    (from..=to).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_a_time_then_follow_the_new_timeline() {
    let archive = Archive::new();
    let primary = archive.primary().await;
    primary
        .execute(
            "CREATE TABLE t (id bigint PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)",
        )
        .await
        .unwrap();
    let base = archive.base_backup(&primary);
    primary
        .execute("INSERT INTO t SELECT generate_series(101, 200)")
        .await
        .unwrap();
    // T: after the commit of 101..200 (the server's clock, as recovery reads it).
    let t: String = primary
        .query_scalar(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', \
             'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        )
        .await
        .unwrap();
    primary
        .execute("INSERT INTO t SELECT generate_series(201, 300)")
        .await
        .unwrap();
    primary.execute("DROP TABLE t").await.unwrap();
    archive.switch_and_wait(&primary).await;

    let dir = archive.restore(&base, "at-t", &["--target-time", &t]);
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o700
    );
    assert!(dir.join("recovery.signal").exists());
    let conf = std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap();
    assert!(
        conf.contains("recovery_target_action = 'promote'"),
        "{conf}"
    );
    assert!(
        conf.contains("recovery_target_timeline = 'latest'"),
        "{conf}"
    );
    assert!(conf.contains("wal-fetch"), "{conf}");

    let at_t = start_restored(&dir).await;
    assert_eq!(
        rows(&at_t, "t").await,
        range(1, 200),
        "exactly the rows committed before T"
    );
    let timeline: String = at_t
        .query_scalar("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
        .await
        .unwrap();
    assert_eq!(timeline, "00000002", "the promotion started timeline 2");
    // The promotion started timeline 2 and archived its history through wal-push.
    let started = Instant::now();
    while !archive.archived("00000002.history") {
        assert!(started.elapsed() < WAIT, "00000002.history not archived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    at_t.execute("INSERT INTO t VALUES (9001)").await.unwrap();
    archive.switch_and_wait(&at_t).await;
    drop(at_t);

    let chain = archive.ok("verify", &["--chain"]);
    assert!(chain.contains(&format!("ok {base}")), "{chain}");
    assert!(chain.contains("timelines 1 -> 2"), "{chain}");

    // The newest timeline is the restored branch: `--latest` follows it, not timeline 1
    // (where the table was dropped).
    let dir = archive.restore(&base, "latest", &["--latest"]);
    let latest = start_restored(&dir).await;
    let mut want = range(1, 200);
    want.push(9001);
    assert_eq!(rows(&latest, "t").await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_restores_every_archived_commit_after_the_primary_is_gone() {
    let archive = Archive::new();
    let mut primary = archive.primary().await;
    primary
        .execute(
            "CREATE TABLE t (id bigint PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 50)",
        )
        .await
        .unwrap();
    let first_base = archive.base_backup(&primary);
    let mut segments = Vec::new();
    let mut second_base = String::new();
    let mut lsn = String::new();
    for batch in 0..3i64 {
        if batch == 1 {
            second_base = archive.base_backup(&primary);
        }
        primary
            .execute(&format!(
                "INSERT INTO t SELECT generate_series({}, {})",
                51 + batch * 50,
                100 + batch * 50
            ))
            .await
            .unwrap();
        if batch == 1 {
            // Just past the commit of 101..150.
            lsn = primary
                .query_scalar("SELECT pg_current_wal_insert_lsn()::text")
                .await
                .unwrap();
        }
        segments.push(archive.switch_and_wait(&primary).await);
    }
    primary
        .execute("INSERT INTO t VALUES (1000)")
        .await
        .unwrap();
    archive.switch_and_wait(&primary).await;
    assert_eq!(
        archive.base_backup_ids(),
        vec![first_base, second_base.clone()]
    );

    // Retention: the older base backup goes, and with it the WAL only it needed; the WAL
    // the kept one needs stays (its chain still verifies, and it restores below).
    let pruned = archive.ok("prune", &["--keep-last", "1"]);
    assert!(pruned.contains("archived WAL: removed"), "{pruned}");
    assert_eq!(archive.base_backup_ids(), vec![second_base.clone()]);
    assert!(
        !archive.archived(&segments[0]),
        "{} is needed by no kept base",
        segments[0]
    );
    assert!(archive.archived(&segments[1]));
    let chain = archive.ok("verify", &["--chain"]);
    assert!(chain.contains(&format!("ok {second_base}")), "{chain}");

    // The primary is lost, data directory and all.
    primary.kill().unwrap();
    std::fs::remove_dir_all(primary.data_dir()).unwrap();

    let dir = archive.restore(&second_base, "latest", &["--latest"]);
    let restored = start_restored(&dir).await;
    let mut want = range(1, 200);
    want.push(1000);
    assert_eq!(rows(&restored, "t").await, want, "every archived commit");
    drop(restored);

    // To a WAL position: the commits before it, on timeline 1 (before the point where the
    // restore above branched off timeline 2).
    let dir = archive.restore(&second_base, "at-lsn", &["--target-lsn", &lsn]);
    let at_lsn = start_restored(&dir).await;
    assert_eq!(rows(&at_lsn, "t").await, range(1, 150));

    // A base backup that does not authenticate leaves nothing behind: no data directory
    // that could be started by mistake, no staging directory.
    let data = archive.store.join(format!("{second_base}.data"));
    let mut bytes = std::fs::read(&data).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x08;
    std::fs::write(&data, &bytes).unwrap();
    let target = archive.dir.path().join("from-tampered");
    let out = archive.run(
        "restore",
        &["--pg-base", &second_base, "--to", s(&target), "--latest"],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tampered"), "{stderr}");
    assert!(!target.exists());
    let staged = std::fs::read_dir(archive.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".ha-dr-restore")
        });
    assert!(!staged, "a staging directory was left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_the_archive_is_named_and_refused() {
    let archive = Archive::new();
    let primary = archive.primary().await;
    primary
        .execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let base = archive.base_backup(&primary);
    let mut segments = Vec::new();
    for i in 0..3 {
        primary
            .execute(&format!("INSERT INTO t VALUES ({i})"))
            .await
            .unwrap();
        segments.push(archive.switch_and_wait(&primary).await);
    }
    let before = archive.ok("verify", &["--chain"]);
    assert!(before.contains(&format!("ok {base}")), "{before}");

    let gone = &segments[1];
    for ext in ["manifest", "data"] {
        std::fs::remove_file(archive.store.join(format!("wal-{gone}.{ext}"))).unwrap();
    }
    let out = archive.run("verify", &["--chain"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("FAILED {base}"))
            && stdout.contains(&format!("segment {gone} is missing")),
        "{stdout}"
    );

    let target = archive.dir.path().join("gap");
    let out = archive.run(
        "restore",
        &["--pg-base", &base, "--to", s(&target), "--latest"],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(gone.as_str()), "{stderr}");
    assert!(!target.exists(), "nothing that could be started");
    let leftovers: Vec<_> = std::fs::read_dir(archive.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".ha-dr-restore")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A segment that is there but does not authenticate breaks the chain too.
    let data = archive.store.join(format!("wal-{}.data", segments[0]));
    let mut bytes = std::fs::read(&data).unwrap();
    let at = bytes.len() - 20;
    bytes[at] ^= 0x40;
    std::fs::write(&data, &bytes).unwrap();
    let out = archive.run("verify", &["--chain"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("wal-{}", segments[0])) && stdout.contains("tampered"),
        "{stdout}"
    );
}

/// A synthetic 16 MiB segment whose first page header matches `segno`.
fn segment(segno: u64, fill: u8) -> Vec<u8> {
    let size: u64 = 16 << 20;
    let mut data = vec![fill; size as usize];
    data[..40].fill(0);
    data[8..16].copy_from_slice(&(segno * size).to_le_bytes());
    data[24..32].copy_from_slice(&7u64.to_le_bytes());
    data[32..36].copy_from_slice(&(size as u32).to_le_bytes());
    data
}

#[test]
fn wal_push_and_fetch_speak_postgres_protocol() {
    let archive = Archive::new();
    let wal = archive.dir.path().join("pg_wal");
    let restore = archive.dir.path().join("restore");
    for d in [&wal, &restore] {
        std::fs::create_dir(d).unwrap();
        hand_to_server_user(d).unwrap();
    }
    let name = "000000010000000000000003";
    let file = wal.join(name);
    std::fs::write(&file, segment(3, 0x11)).unwrap();
    hand_to_server_user(&file).unwrap();
    archive.ok("wal-push", &[s(&file)]);
    assert!(archive.archived(name));
    // PostgreSQL retries a push it did not see finish: the same bytes succeed again.
    archive.ok("wal-push", &[s(&file)]);
    // Other bytes under the same name are an error, and the archive keeps the first.
    let stored = std::fs::read(archive.store.join(format!("wal-{name}.data"))).unwrap();
    std::fs::write(&file, segment(3, 0x22)).unwrap();
    let out = archive.run("wal-push", &[s(&file)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("never overwritten"));
    assert_eq!(
        std::fs::read(archive.store.join(format!("wal-{name}.data"))).unwrap(),
        stored
    );
    // A segment whose header does not match its name is not archived.
    let wrong = wal.join("000000010000000000000004");
    std::fs::write(&wrong, segment(3, 0x11)).unwrap();
    hand_to_server_user(&wrong).unwrap();
    let out = archive.run("wal-push", &[s(&wrong)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!archive.archived("000000010000000000000004"));
    // History files too.
    let history = wal.join("00000002.history");
    std::fs::write(&history, "1\t0/3000000\tno recovery target specified\n").unwrap();
    hand_to_server_user(&history).unwrap();
    archive.ok("wal-push", &[s(&history)]);

    // Fetch: the bytes pushed first, at %p, nothing else left in the directory.
    let dest = restore.join("RECOVERYXLOG");
    archive.ok("wal-fetch", &[name, s(&dest)]);
    assert_eq!(std::fs::read(&dest).unwrap(), segment(3, 0x11));
    archive.ok(
        "wal-fetch",
        &["00000002.history", s(&restore.join("RECOVERYHISTORY"))],
    );
    assert_eq!(std::fs::read_dir(&restore).unwrap().count(), 2);

    // Not archived: status 1, the ordinary "no such file" of a restore_command.
    let missing = restore.join("missing");
    let out = archive.run("wal-fetch", &["000000010000000000000009", s(&missing)]);
    assert_eq!(out.status.code(), Some(1));
    let out = archive.run("wal-fetch", &["00000003.history", s(&missing)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!missing.exists());

    // Tampered: refused with a status that aborts recovery, nothing handed over.
    let data = archive.store.join(format!("wal-{name}.data"));
    let mut bytes = std::fs::read(&data).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&data, &bytes).unwrap();
    let tampered = restore.join("TAMPERED");
    let out = archive.run("wal-fetch", &[name, s(&tampered)]);
    assert_eq!(out.status.code(), Some(255));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tampered"), "{stderr}");
    assert!(!tampered.exists());
    assert_eq!(
        std::fs::read_dir(&restore).unwrap().count(),
        2,
        "no temporary file left"
    );
    // A broken command line or a store that is not there must not read as "not archived"
    // either: PostgreSQL would end recovery early and promote.
    let out = ha_dr(&["wal-fetch", "--no-such-flag", name, s(&tampered)]);
    assert_eq!(out.status.code(), Some(255));
    let nowhere = archive.dir.path().join("no-such-store");
    let out = ha_dr(&[
        "wal-fetch",
        "--store",
        s(&nowhere),
        "--key-file",
        s(&archive.key),
        name,
        s(&tampered),
    ]);
    assert_eq!(out.status.code(), Some(255));
    assert!(!nowhere.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_rpo_breaches_when_archiving_stops_and_recovers_with_a_new_segment() {
    use ha_core::{Component, ComponentContext, HaEvent};
    use ha_dr::{KeyRing, LocalStore, MasterKey, Repository, WalRpoConfig, WalRpoMonitor};

    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::new(
        LocalStore::open(dir.path().join("store")).unwrap(),
        KeyRing::new(MasterKey::generate().unwrap()),
    );
    let rpo = Duration::from_millis(1500);
    let monitor = WalRpoMonitor::new(
        repo.clone(),
        WalRpoConfig {
            rpo,
            check_interval: Duration::from_millis(50),
        },
    )
    .unwrap();
    let push = |segno: u64| {
        let path = dir.path().join(format!("00000001000000000000000{segno}"));
        std::fs::write(&path, segment(segno, 0)).unwrap();
        path
    };
    repo.wal_push(&push(3)).await.unwrap();
    let ctx = ComponentContext::standalone("n1");
    let mut events = ctx.bus.subscribe();
    monitor.start(ctx).await.unwrap();

    let started = Instant::now();
    let breach = loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an RpoBreached within 10 s")
            .unwrap();
        if let HaEvent::RpoBreached {
            kind,
            since_last_backup,
            ..
        } = event
        {
            break (kind, since_last_backup);
        }
    };
    assert_eq!(breach.0, "wal");
    assert!(breach.1.is_some_and(|age| age > rpo), "{breach:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let status = monitor.status();
    assert!(status.breached);
    assert_eq!(status.newest.as_deref(), Some("000000010000000000000003"));

    // Archiving resumes: the next check sees the new segment and the breach ends.
    repo.wal_push(&push(4)).await.unwrap();
    let resumed = Instant::now();
    while monitor.status().breached {
        assert!(
            resumed.elapsed() < Duration::from_secs(10),
            "breach never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        monitor.status().newest.as_deref(),
        Some("000000010000000000000004")
    );
    monitor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_of_one_name_with_different_bytes_store_exactly_one() {
    use ha_dr::{KeyRing, LocalStore, MasterKey, Repository};

    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::new(
        LocalStore::open(dir.path().join("store")).unwrap(),
        KeyRing::new(MasterKey::generate().unwrap()),
    );
    let name = "000000010000000000000005";
    let mut pushes = Vec::new();
    for writer in 0..4u8 {
        let own = dir.path().join(format!("writer-{writer}"));
        std::fs::create_dir(&own).unwrap();
        let path = own.join(name);
        std::fs::write(&path, segment(5, writer + 1)).unwrap();
        let repo = repo.clone();
        pushes.push(tokio::spawn(async move { repo.wal_push(&path).await }));
    }
    let mut stored = 0;
    for push in pushes {
        match push.await.unwrap() {
            Ok(_) => stored += 1,
            Err(e) => assert!(e.to_string().contains("never overwritten"), "{e}"),
        }
    }
    assert_eq!(stored, 1, "one writer wins, the others are refused");
    // What is archived is whole: one writer's bytes, authenticated end to end.
    let back = dir.path().join("back");
    repo.wal_fetch(name, &back).await.unwrap();
    let bytes = std::fs::read(&back).unwrap();
    assert!((1..=4).any(|fill| bytes == segment(5, fill)));
}

/// `ha-dr wal-stream` as a child of the test (as the server's OS user); SIGTERM and a
/// bounded wait on drop.
struct Streamer {
    child: Option<std::process::Child>,
}

impl Streamer {
    fn start(archive: &Archive, pg: &PostgresServer, spool: &Path) -> Self {
        let bin = ha_testkit::binaries::postgres_bin_dir().unwrap();
        let url = format!("postgres://replicator@127.0.0.1:{}/postgres", pg.port());
        let mut command = Command::new(BIN);
        command
            .arg("wal-stream")
            .args(archive.repo_args())
            .args(["--pg-bin", s(&bin), "--url", &url, "--slot", "ha_dr_test"])
            .args(["--spool", s(spool)])
            .env_remove("HA_DR_KEY")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        run_as_server_user(&mut command).unwrap();
        Self {
            child: Some(command.spawn().unwrap()),
        }
    }

    /// SIGTERM, then the exit status and stderr (bounded wait).
    fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > WAIT {
                let _ = child.kill();
                panic!("wal-stream did not exit within {WAIT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        (status, stderr)
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The streamed partials in the store: `(segment, end offset)`.
fn streamed(archive: &Archive) -> Vec<(String, u64)> {
    std::fs::read_dir(&archive.store)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_prefix("wal-")?.strip_suffix(".manifest")?;
            let (segment, end) = stem.split_once(".stream.")?;
            Some((segment.to_owned(), u64::from_str_radix(end, 16).ok()?))
        })
        .collect()
}

/// Streaming with `pg_receivewal` as the primary's synchronous standby: every acknowledged
/// commit is in pg_receivewal's spool before the client hears of it, and wal-stream
/// archives the segment being received when the primary goes away. With `archive_timeout`
/// at 60 s the archive alone would hold none of the commits after the base backup; after a
/// SIGKILL of the primary and the loss of its data directory, `restore --latest` recovers
/// every acknowledged commit, through the newest streamed partial (the complete segment
/// never existed). A completed segment is archived by `wal-push` and `wal-stream` alike
/// (the same bytes: no conflict). `wal-fetch` serves a partial only with `--partial`, and
/// refuses a tampered one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_stream_keeps_every_acknowledged_commit_when_the_primary_is_lost() {
    let archive = Archive::new();
    let mut primary = PostgresServer::builder()
        .archive_command(format!(
            "'{BIN}' wal-push --store '{}' --key-file '{}' %p",
            s(&archive.store),
            s(&archive.key)
        ))
        .archive_timeout(Duration::from_secs(60))
        .replication_user("replicator")
        .start()
        .await
        .unwrap();
    primary
        .execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let base = archive.base_backup(&primary);
    let spool = archive.dir.path().join("spool");
    let mut streamer = Streamer::start(&archive, &primary, &spool);

    // Streaming: pg_receivewal is the synchronous standby (commits wait for it from here;
    // set after the base backup, which the restore below starts from without it).
    primary
        .execute("ALTER SYSTEM SET synchronous_standby_names = 'pg_receivewal'")
        .await
        .unwrap();
    primary.execute("SELECT pg_reload_conf()").await.unwrap();
    let started = Instant::now();
    loop {
        let state: Option<String> = primary
            .query_scalar(
                "SELECT max(sync_state) FROM pg_stat_replication \
                 WHERE application_name = 'pg_receivewal' AND state = 'streaming'",
            )
            .await
            .unwrap();
        if state.as_deref() == Some("sync") {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "pg_receivewal never became the synchronous standby: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&spool).unwrap().permissions())
            & 0o777,
        0o700,
        "the spool is private"
    );

    // Commits, one per statement, each acknowledged; a segment switch in the middle.
    let mut conn = primary.connect().await.unwrap();
    let mut acknowledged = 0i64;
    let mut switched = String::new();
    let writing = Instant::now();
    while writing.elapsed() < Duration::from_secs(3) {
        acknowledged += 1;
        sqlx::query("INSERT INTO t VALUES ($1)")
            .bind(acknowledged)
            .execute(&mut conn)
            .await
            .unwrap();
        if acknowledged == 50 {
            switched = sqlx::query_scalar("SELECT pg_walfile_name(pg_switch_wal())")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        }
    }
    // The last commit's WAL lies past this position.
    let last_lsn: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    acknowledged += 1;
    sqlx::query("INSERT INTO t VALUES ($1)")
        .bind(acknowledged)
        .execute(&mut conn)
        .await
        .unwrap();
    let current: String = sqlx::query_scalar("SELECT pg_walfile_name(pg_current_wal_flush_lsn())")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(acknowledged > 100, "only {acknowledged} commits in 3 s");
    drop(conn);

    // The switched segment: archived, and wal-stream pushed its own copy and removed it from
    // the spool (same bytes as wal-push's, or it would stay there).
    let started = Instant::now();
    while !archive.archived(&switched) || spool.join(&switched).exists() {
        assert!(
            started.elapsed() < WAIT,
            "{switched} not archived by wal-stream: archived {}, in spool {}",
            archive.archived(&switched),
            spool.join(&switched).exists()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The primary is lost, data directory and all. wal-stream archives what pg_receivewal
    // received: the streamed partial of the current segment reaching the last commit.
    primary.kill().unwrap();
    std::fs::remove_dir_all(primary.data_dir()).unwrap();
    let offset = {
        let lsn: ha_dr::Lsn = last_lsn.parse().unwrap();
        lsn.0 % (16 << 20)
    };
    let started = Instant::now();
    while !streamed(&archive)
        .iter()
        .any(|(seg, end)| *seg == current && *end > offset)
    {
        assert!(
            started.elapsed() < WAIT,
            "no streamed partial of {current} reaching offset {offset:#x}: {:?}",
            streamed(&archive)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, stderr) = streamer.stop();
    assert!(status.success(), "wal-stream: {status}\n{stderr}");
    assert!(stderr.contains("pg_receivewal"), "{stderr}");
    assert!(
        !archive.archived(&current),
        "the segment being written was never completed"
    );
    let partials: Vec<_> = streamed(&archive)
        .into_iter()
        .filter(|(seg, _)| *seg == current)
        .collect();
    assert_eq!(
        partials.len(),
        1,
        "superseded partials deleted: {partials:?}"
    );

    let dir = archive.restore(&base, "streamed", &["--latest"]);
    let conf = std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap();
    assert!(
        conf.contains("wal-fetch") && conf.contains("--partial"),
        "{conf}"
    );
    let restored = start_restored(&dir).await;
    assert_eq!(
        rows(&restored, "t").await,
        range(1, acknowledged),
        "every acknowledged commit"
    );
    drop(restored);

    // A partial is served only when asked for, and never when it does not authenticate.
    let fetched = archive.dir.path().join("fetched");
    std::fs::create_dir(&fetched).unwrap();
    hand_to_server_user(&fetched).unwrap();
    let out = archive.run("wal-fetch", &[&current, s(&fetched.join("plain"))]);
    assert_eq!(out.status.code(), Some(1), "not archived without --partial");
    archive.ok(
        "wal-fetch",
        &["--partial", &current, s(&fetched.join("partial"))],
    );
    assert_eq!(
        std::fs::metadata(fetched.join("partial")).unwrap().len(),
        16 << 20,
        "a zero-padded whole segment"
    );
    let (_, end) = &partials[0];
    let data = archive
        .store
        .join(format!("wal-{current}.stream.{end:08X}.data"));
    let mut bytes = std::fs::read(&data).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&data, &bytes).unwrap();
    let out = archive.run(
        "wal-fetch",
        &["--partial", &current, s(&fetched.join("tampered"))],
    );
    assert_eq!(out.status.code(), Some(255));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tampered"), "{stderr}");
    assert!(!fetched.join("tampered").exists());
}
