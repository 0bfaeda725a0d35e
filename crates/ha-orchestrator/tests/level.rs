//! The HA level a running node reports, and the `HaLevelChanged` events it publishes.

mod common;

use std::time::Duration;

use common::{fast, ok_check};
use ha_core::{HaEvent, HaLevel};
use ha_failover::{ComponentConfig, Router, RouterSwitch};
use ha_orchestrator::{HaNode, LevelReport};
use ha_replication::{FileReplicator, FileSync, FileSyncConfig};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(10);

async fn wait_level(rx: &mut watch::Receiver<LevelReport>, level: HaLevel) -> LevelReport {
    let reached = tokio::time::timeout(WAIT, rx.wait_for(|r| r.level == level))
        .await
        .map(|r| r.map(|r| r.clone()));
    match reached {
        Ok(report) => report.expect("level channel"),
        Err(_) => panic!("level {level} not reached: {:?}", *rx.borrow()),
    }
}

/// The next `HaLevelChanged` on `events`.
async fn next_change(events: &mut ha_core::EventSubscriber) -> (HaLevel, HaLevel, String) {
    tokio::time::timeout(WAIT, async {
        loop {
            if let HaEvent::HaLevelChanged {
                from, to, reason, ..
            } = events.recv().await.expect("bus")
            {
                return (from, to, reason);
            }
        }
    })
    .await
    .expect("a HaLevelChanged event")
}

#[tokio::test]
async fn checks_failover_and_file_sync_make_standard_and_a_pause_makes_basic() {
    let source = tempfile::tempdir().expect("tempdir");
    let target = tempfile::tempdir().expect("tempdir");
    std::fs::write(source.path().join("app.toml"), "x = 1\n").expect("write");
    let replicator = FileReplicator::local(source.path(), target.path(), FileSyncConfig::default())
        .expect("replicator");
    let sync = FileSync::new(replicator, Duration::from_millis(100)).expect("file sync");
    let router = Router::new("primary", "secondary");
    let node = HaNode::builder()
        .node_id("a")
        .single_node()
        .check(ok_check("api"), fast())
        .failover(
            "api",
            RouterSwitch::new(router.clone()),
            ComponentConfig::default(),
        )
        .file_sync(sync)
        .build()
        .expect("build");

    let before = node.level();
    assert_eq!(before.level, HaLevel::None, "nothing runs before start");
    assert_eq!(before.configured, HaLevel::Standard);

    let mut events = node.bus().subscribe();
    let mut level = node.watch_level();
    node.start().await.expect("start");
    let report = wait_level(&mut level, HaLevel::Standard).await;
    assert_eq!(report.configured, HaLevel::Standard);
    assert!(report.reasons.is_empty(), "{report:?}");
    assert_eq!(report.target_percent, 99.9);
    assert_eq!(report.summary(), "standard");
    assert!(target.path().join("app.toml").exists(), "the file sync ran");
    // The level rose from none, possibly through basic while the first sync ran.
    let mut change = next_change(&mut events).await;
    assert_eq!(change.0, HaLevel::None);
    while change.1 != HaLevel::Standard {
        change = next_change(&mut events).await;
    }

    node.pause();
    let report = wait_level(&mut level, HaLevel::Basic).await;
    assert_eq!(report.configured, HaLevel::Standard);
    assert_eq!(report.reasons, ["automatic failover is paused"]);
    assert_eq!(report.summary(), "basic: automatic failover is paused");
    let (from, to, reason) = next_change(&mut events).await;
    assert_eq!((from, to), (HaLevel::Standard, HaLevel::Basic));
    assert_eq!(reason, "automatic failover is paused");

    node.resume();
    wait_level(&mut level, HaLevel::Standard).await;
    let (from, to, _) = next_change(&mut events).await;
    assert_eq!((from, to), (HaLevel::Basic, HaLevel::Standard));
    assert_eq!(
        router.active(),
        ha_failover::Target::Primary,
        "nothing failed over"
    );
    node.shutdown().await;
    // A stopped node delivers nothing, and says so.
    assert_eq!(level.borrow_and_update().level, HaLevel::None);
    assert_eq!(node.level().configured, HaLevel::Standard);
}

#[tokio::test]
async fn checks_alone_are_basic() {
    let node = HaNode::builder()
        .node_id("a")
        .check(ok_check("api"), fast())
        .build()
        .expect("build");
    let mut level = node.watch_level();
    node.start().await.expect("start");
    let report = wait_level(&mut level, HaLevel::Basic).await;
    assert_eq!(report.configured, HaLevel::Basic);
    assert_eq!(report.target_percent, 99.5);
    node.shutdown().await;
}
