//! Real PostgreSQL primaries and replicas: start, restart, crash, pause, replicate, promote,
//! clean up.

use std::time::Duration;

use ha_testkit::{Lsn, PostgresServer};

/// Generous bound for replication to catch up on a loaded 2-core machine.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether `pid` runs: exists and is not a zombie (killed backends are reparented, so they
/// may linger as zombies until init reaps them).
fn pid_alive(pid: i32) -> bool {
    process_state(pid).is_some_and(|state| state != "Z" && state != "X")
}

/// The state letter from `/proc/<pid>/stat` (`T` = stopped), if the process exists.
fn process_state(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .next()?
            .to_owned(),
    )
}

/// Signals land asynchronously: poll the state with a deadline.
fn wait_for_state(pid: i32, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let state = process_state(pid);
        if state.as_deref() == Some(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} is in state {state:?}, not {want}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

async fn count(pg: &PostgresServer, table: &str) -> i64 {
    pg.query_scalar(&format!("SELECT count(*) FROM {table}"))
        .await
        .expect("count rows")
}

async fn backend_pid(conn: &mut sqlx::PgConnection) -> i32 {
    tokio::time::timeout(
        Duration::from_secs(5),
        sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(conn),
    )
    .await
    .expect("pg_backend_pid() in time")
    .expect("pg_backend_pid()")
}

#[tokio::test]
async fn starts_with_settings_and_runs_sql() {
    let pg = PostgresServer::builder()
        .setting("work_mem", "7MB")
        .setting("application_name", "it's quoted")
        .start()
        .await
        .unwrap();
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port())
    );
    assert_eq!(pg.addr().port(), pg.port());
    let port: String = pg.query_scalar("SHOW port").await.unwrap();
    assert_eq!(port, pg.port().to_string());
    let work_mem: String = pg.query_scalar("SHOW work_mem").await.unwrap();
    assert_eq!(work_mem, "7MB");
    let fsync: String = pg.query_scalar("SHOW fsync").await.unwrap();
    assert_eq!(fsync, "on");
    assert!(!pg.is_in_recovery().await.unwrap());

    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let inserted = pg
        .execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
        .await
        .unwrap();
    assert_eq!(inserted, 2);
    let v: String = pg
        .query_scalar("SELECT v FROM t WHERE id = 2")
        .await
        .unwrap();
    assert_eq!(v, "b");

    pg.execute("CREATE DATABASE other").await.unwrap();
    let mut conn = pg.connect_to("other").await.unwrap();
    let db: String = tokio::time::timeout(
        Duration::from_secs(5),
        sqlx::query_scalar("SELECT current_database()").fetch_one(&mut conn),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(db, "other");

    let err = pg.execute("SELECT * FROM no_such_table").await.unwrap_err();
    assert!(err.to_string().contains("no_such_table"), "{err}");
}

#[tokio::test]
async fn graceful_restart_keeps_data_and_port() {
    let mut pg = PostgresServer::start().await.unwrap();
    let port = pg.port();
    pg.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    pg.stop();
    assert!(!pg.is_running());
    assert!(pg.connect().await.is_err());

    pg.restart().await.unwrap();
    assert!(pg.is_running());
    assert_eq!(pg.port(), port);
    assert_eq!(count(&pg, "t").await, 1);
    // A clean shutdown needs no recovery.
    assert!(
        !pg.log_tail().contains("automatic recovery in progress"),
        "{}",
        pg.log_tail()
    );
}

#[tokio::test]
async fn kill_then_restart_recovers_committed_rows() {
    let mut pg = PostgresServer::start().await.unwrap();
    pg.execute("CREATE TABLE t (id int)").await.unwrap();
    pg.execute("INSERT INTO t SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    let pid = pg.pid().unwrap();
    let mut conn = pg.connect().await.unwrap();
    let backend = backend_pid(&mut conn).await;

    pg.kill().unwrap();
    assert!(!pg.is_running());
    assert!(!pid_alive(pid));
    // Backends leave the postmaster's process group (setsid), yet die with it.
    assert!(!pid_alive(backend), "backend {backend} survived the kill");
    drop(conn);
    assert!(pg.connect().await.is_err());

    pg.restart().await.unwrap();
    assert!(
        pg.log_tail().contains("automatic recovery in progress"),
        "expected crash recovery; log:\n{}",
        pg.log_tail()
    );
    assert_eq!(count(&pg, "t").await, 1000);
}

#[tokio::test]
async fn paused_server_answers_nothing_until_resumed() {
    let pg = PostgresServer::start().await.unwrap();
    let mut conn = pg.connect().await.unwrap();
    let backend = backend_pid(&mut conn).await;
    pg.pause().unwrap();
    wait_for_state(pg.pid().unwrap(), "T");

    let stalled = tokio::time::timeout(
        Duration::from_millis(300),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&mut conn),
    )
    .await;
    assert!(stalled.is_err(), "a paused server answered: {stalled:?}");
    wait_for_state(backend, "T");
    drop(conn);

    pg.resume().unwrap();
    let one: i32 = tokio::time::timeout(Duration::from_secs(10), pg.query_scalar("SELECT 1"))
        .await
        .expect("resumed server answers")
        .unwrap();
    assert_eq!(one, 1);
}

#[tokio::test]
async fn replica_streams_read_only_from_an_active_slot() {
    let primary = PostgresServer::start().await.unwrap();
    let replica = primary.start_replica().await.unwrap();
    assert_ne!(replica.port(), primary.port());
    assert!(replica.is_in_recovery().await.unwrap());

    let slot = replica.slot_name().unwrap().to_owned();
    let active: bool = primary
        .query_scalar(&format!(
            "SELECT active FROM pg_replication_slots \
             WHERE slot_name = '{slot}' AND slot_type = 'physical'"
        ))
        .await
        .unwrap();
    assert!(active, "slot {slot} is not active");
    let streaming: i64 = primary
        .query_scalar("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
        .await
        .unwrap();
    assert_eq!(streaming, 1);

    primary
        .execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2), (3)")
        .await
        .unwrap();
    let lsn = primary.current_wal_lsn().await.unwrap();
    assert!(lsn > Lsn(0));
    replica.wait_for_replay(lsn, REPLAY_TIMEOUT).await.unwrap();
    assert!(replica.replay_lsn().await.unwrap().unwrap() >= lsn);
    assert_eq!(count(&replica, "t").await, 3);

    let err = replica
        .execute("INSERT INTO t VALUES (4)")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    assert!(replica.current_wal_lsn().await.is_err());

    // A position the primary has not written yet: the error names what was replayed.
    let beyond = Lsn(lsn.0 + (1 << 32));
    let err = replica
        .wait_for_replay(beyond, Duration::from_millis(200))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("last replayed LSN") && text.contains(&beyond.to_string()),
        "{text}"
    );

    // A primary has no replay position.
    assert_eq!(primary.replay_lsn().await.unwrap(), None);
}

#[tokio::test]
async fn promoted_replica_accepts_writes_and_drop_removes_its_slot() {
    let primary = PostgresServer::start().await.unwrap();
    primary
        .execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let replica = primary.start_replica().await.unwrap();
    let lsn = primary.current_wal_lsn().await.unwrap();
    replica.wait_for_replay(lsn, REPLAY_TIMEOUT).await.unwrap();

    replica.promote().await.unwrap();
    assert!(!replica.is_in_recovery().await.unwrap());
    assert!(!replica.data_dir().join("standby.signal").exists());
    replica.execute("INSERT INTO t VALUES (2)").await.unwrap();
    assert_eq!(count(&replica, "t").await, 2);
    assert_eq!(count(&primary, "t").await, 1, "the old primary diverged");
    replica.current_wal_lsn().await.unwrap();

    let slot_sql = format!(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
        replica.slot_name().unwrap()
    );
    let slots: i64 = primary.query_scalar(&slot_sql).await.unwrap();
    assert_eq!(slots, 1);
    drop(replica);
    let slots: i64 = primary.query_scalar(&slot_sql).await.unwrap();
    assert_eq!(
        slots, 0,
        "the dropped replica's slot is still on the primary"
    );
}

#[tokio::test]
async fn concurrent_servers_get_different_ports() {
    let (a, b) = tokio::join!(PostgresServer::start(), PostgresServer::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    a.execute("CREATE TABLE only_in_a (id int)").await.unwrap();
    assert!(b.execute("SELECT * FROM only_in_a").await.is_err());
    for pg in [&a, &b] {
        let port: String = pg.query_scalar("SHOW port").await.unwrap();
        assert_eq!(port, pg.port().to_string());
    }
}

#[tokio::test]
async fn drop_stops_the_server_and_removes_its_directory() {
    let pg = PostgresServer::start().await.unwrap();
    let pid = pg.pid().unwrap();
    let data_dir = pg.data_dir().to_path_buf();
    let addr = pg.addr();
    assert!(pid_alive(pid));
    assert!(data_dir.join("PG_VERSION").exists());

    drop(pg);
    assert!(!pid_alive(pid));
    assert!(!data_dir.exists());
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[tokio::test]
async fn drop_after_kill_removes_the_leftover_shared_memory() {
    let mut pg = PostgresServer::start().await.unwrap();
    // Line 7 of postmaster.pid is "<shm key> <shm id>".
    let pid_file = std::fs::read_to_string(pg.data_dir().join("postmaster.pid")).unwrap();
    let shm_id: u64 = pid_file
        .lines()
        .nth(6)
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    let shm_listed = |id: u64| {
        std::fs::read_to_string("/proc/sysvipc/shm")
            .unwrap()
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(1) == Some(&id.to_string()))
    };
    assert!(shm_listed(shm_id));

    pg.kill().unwrap();
    assert!(shm_listed(shm_id), "SIGKILL leaves the segment behind");
    drop(pg);
    assert!(!shm_listed(shm_id));
}
