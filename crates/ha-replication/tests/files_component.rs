//! `FileSync` as a component: a started sync mirrors the source onto the target every
//! interval, leader-only syncs wait for leadership, and stop ends the runs.
#![cfg(unix)]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use ha_core::{Component, ComponentContext, Leadership, LeadershipGate, Status};
use ha_replication::files::{FileReplicator, FileSync, FileSyncConfig};
use tokio::time::Instant;

const INTERVAL: Duration = Duration::from_millis(50);

/// A node that never leads.
#[derive(Debug)]
struct Follower;

impl LeadershipGate for Follower {
    fn is_leader(&self) -> Option<Leadership> {
        None
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_sync_copies_files_and_stop_ends_it() {
    let (source, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(source.path().join("a.conf"), "a = 1\n").unwrap();
    let replicator =
        FileReplicator::local(source.path(), target.path(), FileSyncConfig::default()).unwrap();
    let sync = FileSync::new(replicator, INTERVAL).unwrap();
    assert_eq!(sync.name(), "file-sync-files");
    assert_eq!(sync.status(), Status::Unknown, "no run yet");

    let ctx = ComponentContext::standalone("n1");
    sync.start(ctx.clone()).await.unwrap();
    assert!(sync.start(ctx).await.is_err(), "a second start is refused");
    wait_for("the first file on the target", || {
        target.path().join("a.conf").exists()
    })
    .await;
    wait_for("a finished run", || sync.runs() > 0).await;
    assert_eq!(sync.status(), Status::Healthy);
    assert!(sync.last_report().unwrap().is_clean());
    assert!(sync.last_error().is_none());

    // A file added later arrives with a later run.
    std::fs::write(source.path().join("b.conf"), "b = 2\n").unwrap();
    wait_for("the second file on the target", || {
        target.path().join("b.conf").exists()
    })
    .await;

    sync.stop().await.unwrap();
    sync.stop().await.unwrap();
    let runs = sync.runs();
    std::fs::write(source.path().join("c.conf"), "c = 3\n").unwrap();
    tokio::time::sleep(INTERVAL * 6).await;
    assert_eq!(sync.runs(), runs, "no run after stop");
    assert!(
        !target.path().join("c.conf").exists(),
        "nothing synced after stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_only_sync_skips_while_this_node_does_not_lead() {
    let (source, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(source.path().join("a.conf"), "a = 1\n").unwrap();
    let replicator =
        FileReplicator::local(source.path(), target.path(), FileSyncConfig::default()).unwrap();
    let sync = FileSync::new(replicator, INTERVAL)
        .unwrap()
        .named("config-files")
        .leader_only(true);
    assert_eq!(sync.name(), "config-files");
    let ctx = ComponentContext::standalone("n2").with_leadership(Arc::new(Follower));
    sync.start(ctx).await.unwrap();
    tokio::time::sleep(INTERVAL * 6).await;
    assert_eq!(sync.runs(), 0);
    assert!(!target.path().join("a.conf").exists());
    sync.stop().await.unwrap();

    // The same component on a leader (a restart after stop is allowed).
    sync.start(ComponentContext::standalone("n2"))
        .await
        .unwrap();
    wait_for("the file on the target", || {
        target.path().join("a.conf").exists()
    })
    .await;
    sync.stop().await.unwrap();
}

#[test]
fn the_interval_must_be_positive() {
    let dir = tempfile::tempdir().unwrap();
    let replicator =
        FileReplicator::local(dir.path(), dir.path().join("t"), FileSyncConfig::default()).unwrap();
    let err = FileSync::new(replicator, Duration::ZERO).unwrap_err();
    assert!(err.to_string().contains("interval"), "{err}");
}
