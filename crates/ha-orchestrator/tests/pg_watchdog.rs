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
const WAIT: Duration = Duration::from_secs(30);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_no_writable_primary_past_its_lease() {
    let redis = RedisServer::start()
        .await
        .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
    let mut primary = PostgresServer::start()
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
    let mut node = HaNodeProcess::start(binary, dir.path(), "a", &redis.url(), &options)
        .unwrap_or_else(|e| panic!("cannot start ha-node: {e}"));
    until("the node to serve /primary with its watchdog armed", || {
        let armed = node
            .get("/status")
            .is_ok_and(|(_, body)| body.contains("\"watchdog\":\"armed\""));
        armed && node.get("/primary").is_ok_and(|(code, _)| code == 200)
    });

    let stop = tokio_util::sync::CancellationToken::new();
    let acks = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let writer = tokio::spawn(checker(primary.url(), acks.clone(), stop.clone()));
    let watcher = tokio::spawn(lease_watch(
        redis.addr(),
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

    let node_pid = node.pid().unwrap();
    node.kill().unwrap();
    let killed = Instant::now();
    // Keep writing until well past the latest deadline the lease record allows.
    let observe_until = killed + TTL + Duration::from_secs(2);
    tokio::time::sleep_until(observe_until).await;
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
        "the record names the killed node: {record:?}"
    );
    let deadline = last_change + TTL;
    let acks = acks.lock().unwrap().clone();
    assert!(
        acks.iter()
            .any(|&a| a + Duration::from_millis(500) > killed && a < killed),
        "no commit acknowledged in the 500 ms before the kill: the checker saw nothing"
    );
    let last_ack = *acks.last().unwrap();
    let late: Vec<_> = acks.iter().filter(|&&a| a >= deadline).collect();
    assert!(
        late.is_empty(),
        "{} commits acknowledged after the lease deadline (last {:?} after it)",
        late.len(),
        last_ack - deadline
    );
    assert!(
        !primary.is_running(),
        "the watchdog did not stop the postmaster; node {node_pid} log:\n{}",
        node.log_tail(30)
    );
    let log = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
    assert!(
        log.contains("fencing PostgreSQL: the agent is gone while armed"),
        "{log}"
    );
    eprintln!(
        "watchdog: last commit {:?} after the kill, {:?} before the lease deadline \
         (deadline {:?} after the kill)",
        last_ack.saturating_duration_since(killed),
        deadline - last_ack,
        deadline - killed
    );
}
