//! The agent's watchdog with real processes: an `ha-node` (the binary) runs a `PgAgent` with
//! the watchdog beside a real PostgreSQL primary and holds the lease on a real
//! `redis-server`. The node alone is SIGKILLed. A checker outside the system keeps
//! committing to the database directly and watches the lease record in Redis; it proves no
//! commit is acknowledged after the lease deadline (`ttl` after the last change of the record
//! it saw — when another member could take over).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ha_testkit::{HaNodeOptions, HaNodeProcess, PostgresServer, RedisServer};
use sqlx::Connection;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(60);

/// Blocking poll (the node's helpers are blocking) with a deadline.
fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Commits one row after another on fresh or kept connections, recording when each commit
/// was acknowledged, until `stop`.
async fn checker(
    url: String,
    acks: Arc<Mutex<Vec<Instant>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut conn: Option<sqlx::PgConnection> = None;
    while !stop.is_cancelled() {
        if conn.is_none() {
            conn = tokio::time::timeout(
                Duration::from_millis(500),
                sqlx::PgConnection::connect(&url),
            )
            .await
            .ok()
            .and_then(Result::ok);
            if conn.is_none() {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        }
        let c = conn.as_mut().unwrap();
        let insert = sqlx::query("INSERT INTO w (note) VALUES ('checker')").execute(&mut *c);
        match tokio::time::timeout(Duration::from_millis(500), insert).await {
            Ok(Ok(_)) => acks.lock().unwrap().push(Instant::now()),
            _ => conn = None,
        }
    }
}

/// Polls the lease record; returns when each distinct value was first seen.
async fn lease_watch(
    redis: std::net::SocketAddr,
    key: String,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    while !stop.is_cancelled() {
        if let Ok(value) =
            ha_testkit::redis::command(redis, &["GET", &key], Duration::from_millis(500)).await
        {
            let text = value.as_str().unwrap_or("").to_owned();
            let mut seen = seen.lock().unwrap();
            if seen.last().is_none_or(|(_, last)| *last != text) {
                seen.push((Instant::now(), text));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A Redis server, a primary with table `w`, and one `ha-node` "a" running the agent with
/// its watchdog over that primary, leading with the watchdog armed.
struct Setup {
    node: HaNodeProcess,
    primary: PostgresServer,
    redis: RedisServer,
    dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let redis = RedisServer::start()
        .await
        .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
    let primary = PostgresServer::start()
        .await
        .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
    primary
        .execute("CREATE TABLE w (id bigserial PRIMARY KEY, note text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = HaNodeOptions {
        cluster: "wd".into(),
        ttl: TTL,
        heartbeat: Duration::from_millis(500),
        retry: Duration::from_millis(200),
        extra_toml: format!(
            "[replication.agent]\nmember = {{ name = \"db-a\", url = \"{url}\" }}\n\n\
             [replication.agent.settings]\nloop_interval = \"200ms\"\n\
             demote_margin = \"600ms\"\ndemote_timeout = \"500ms\"\n\n\
             [replication.agent.settings.watchdog]\nenabled = true\n",
            url = primary.url()
        ),
        ..HaNodeOptions::default()
    };
    // The watchdog binary is found beside ha-node (both are this package's binaries).
    let binary = Path::new(env!("CARGO_BIN_EXE_ha-node"));
    assert!(Path::new(env!("CARGO_BIN_EXE_ha-pg-watchdog")).is_file());
    let node = HaNodeProcess::start(binary, dir.path(), "a", &redis.url(), &options)
        .unwrap_or_else(|e| panic!("cannot start ha-node: {e}"));
    until("the node to serve /primary with its watchdog armed", || {
        let armed = node
            .get("/status")
            .is_ok_and(|(_, body)| body.contains("\"watchdog\":\"armed\""));
        armed && node.get("/primary").is_ok_and(|(code, _)| code == 200)
    });
    Setup {
        node,
        primary,
        redis,
        dir,
    }
}

impl Setup {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("a.log")).unwrap()
    }

    /// The watchdog's own report of its fence (what it did and how long it took).
    fn fence_line(&self) -> String {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains("fenced ("))
            .map(str::to_owned);
        line.unwrap_or_else(|| panic!("the watchdog reported no fence:\n{log}"))
    }

    /// Runs the checker and the lease watcher, applies `fault` once commits flow and the
    /// lease is being renewed, observes until well past any deadline, and asserts that no
    /// commit was acknowledged at or after the lease deadline and that the postmaster is
    /// gone. Returns (fault → last commit, last commit → deadline).
    async fn no_commit_past_the_lease(
        &mut self,
        fault: impl FnOnce(&mut Self),
    ) -> (Duration, Duration) {
        let stop = tokio_util::sync::CancellationToken::new();
        let acks = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let writer = tokio::spawn(checker(self.primary.url(), acks.clone(), stop.clone()));
        let watcher = tokio::spawn(lease_watch(
            self.redis.addr(),
            "ha:lease:{wd/leader}".into(),
            seen.clone(),
            stop.clone(),
        ));
        // Commits flow and the lease is renewed before the fault.
        let warm = Instant::now() + WAIT;
        while acks.lock().unwrap().len() < 20 || seen.lock().unwrap().len() < 3 {
            assert!(
                Instant::now() < warm,
                "no commits ({}) or no renewals ({:?}) seen",
                acks.lock().unwrap().len(),
                seen.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fault(self);
        let faulted = Instant::now();
        // Keep writing until well past the latest deadline the lease record allows.
        tokio::time::sleep_until(faulted + TTL + Duration::from_secs(2)).await;
        stop.cancel();
        writer.await.unwrap();
        watcher.await.unwrap();

        let seen = seen.lock().unwrap().clone();
        // The last renewal's record (the key expires later, at 2 × ttl, and reads empty).
        let (last_change, record) = seen
            .iter()
            .rev()
            .find(|(_, v)| !v.is_empty())
            .cloned()
            .unwrap();
        assert!(
            record.ends_with("\na"),
            "the record names the faulted node: {record:?}"
        );
        let deadline = last_change + TTL;
        let acks = acks.lock().unwrap().clone();
        assert!(
            acks.iter()
                .any(|&a| a + Duration::from_millis(500) > faulted && a < faulted),
            "no commit acknowledged in the 500 ms before the fault: the checker saw nothing"
        );
        let last_ack = *acks.last().unwrap();
        let late = acks.iter().filter(|&&a| a >= deadline).count();
        assert_eq!(
            late,
            0,
            "commits acknowledged after the lease deadline (the last {:?} after it)",
            last_ack - deadline
        );
        assert!(
            !self.primary.is_running(),
            "the watchdog did not stop the postmaster; log:\n{}",
            self.log()
        );
        (
            last_ack.saturating_duration_since(faulted),
            deadline - last_ack,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_no_writable_primary_past_its_lease() {
    let mut s = setup().await;
    let (after, margin) = s.no_commit_past_the_lease(|s| s.node.kill().unwrap()).await;
    assert!(
        s.log()
            .contains("fencing PostgreSQL: the agent is gone while armed"),
        "{}",
        s.log()
    );
    eprintln!("{}", s.fence_line());
    eprintln!(
        "watchdog (SIGKILL): last commit {after:?} after the kill, {margin:?} before the lease deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_leaves_no_writable_primary_past_its_lease() {
    let mut s = setup().await;
    let (after, margin) = s
        .no_commit_past_the_lease(|s| s.node.pause().unwrap())
        .await;
    s.node.resume().unwrap();
    assert!(
        s.log()
            .contains("fencing PostgreSQL: the agent's deadline passed"),
        "{}",
        s.log()
    );
    eprintln!("{}", s.fence_line());
    eprintln!(
        "watchdog (SIGSTOP): last commit {after:?} after the stop, {margin:?} before the lease deadline"
    );
}

/// A node stopped cleanly releases its lease and demotes its primary first: the watchdog,
/// disarmed, exits without stopping PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanly_stopped_node_demotes_and_its_watchdog_exits_without_fencing() {
    let mut s = setup().await;
    s.node.stop();
    assert!(s.primary.is_running(), "the database was stopped");
    assert!(
        s.primary
            .execute("INSERT INTO w (note) VALUES ('after the stop')")
            .await
            .is_err(),
        "the released primary still takes writes"
    );
    let deadline = std::time::Instant::now() + WAIT;
    while !s.log().contains("the agent is gone; disarmed: exiting") {
        assert!(
            std::time::Instant::now() < deadline,
            "the watchdog did not exit: {}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!s.log().contains("fencing PostgreSQL"), "{}", s.log());
    assert!(s.primary.is_running(), "the database was stopped");
}
