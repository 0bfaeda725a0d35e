//! The scheduler over a real repository, store and directory, in real time.

use std::sync::Arc;
use std::time::Duration;

use ha_core::{AlwaysLeader, Component, ComponentContext, EventBus, FencingToken, HaEvent};
use ha_dr::{
    BackupScheduler, KeyRing, LocalStore, MasterKey, Repository, RetentionPolicy, ScheduleConfig,
    Source, SourceSchedule,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_are_verified_tracked_and_pruned() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    std::fs::write(data.join("a.txt"), "hello").expect("write");
    let repo = Repository::new(
        LocalStore::open(dir.path().join("store")).expect("store"),
        KeyRing::new(MasterKey::generate().expect("key")),
    );
    let mut config = ScheduleConfig {
        rpo_check_interval: Duration::from_millis(50),
        ..ScheduleConfig::default()
    };
    config.sources.insert(
        "data".into(),
        SourceSchedule {
            interval: Some(Duration::from_millis(300)),
            rpo: Some(Duration::from_secs(10)),
            restore_test: true,
            retention: Some(RetentionPolicy {
                keep_last: 2,
                ..RetentionPolicy::default()
            }),
            ..SourceSchedule::default()
        },
    );
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let scheduler = BackupScheduler::builder(repo.clone())
        .config(config)
        .source("data", Source::dir(&data))
        .build()
        .expect("build");
    let ctx = ComponentContext::standalone("n1")
        .with_bus(bus)
        .with_leadership(Arc::new(AlwaysLeader::new(FencingToken(1))));
    scheduler.start(ctx).await.expect("start");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = scheduler.status("data").expect("status");
        if status.runs >= 4 && !status.running && status.last_verified_id.is_some() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no four verified runs in 30 s: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    scheduler.stop().await.expect("stop");

    assert!(status.last_error.is_none(), "{status:?}");
    assert!(!status.rpo_breached, "{status:?}");
    assert_eq!(status.rto_met, Some(true), "{status:?}");
    let newest = status.last_verified_id.expect("verified");
    let listed = repo.list().await.expect("list");
    assert!(listed.iter().any(|m| m.id.as_str() == newest));
    assert!(
        listed.len() <= 3,
        "retention keeps the last 2 (+1 in flight): {}",
        listed.len()
    );

    let mut completed = 0;
    let mut restored = 0;
    while let Ok(event) = events.try_recv() {
        match event {
            HaEvent::BackupCompleted { kind, .. } => {
                assert_eq!(kind, "dir");
                completed += 1;
            }
            HaEvent::RestoreCompleted { .. } => restored += 1,
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(
        completed >= 3,
        "one BackupCompleted per run, not per attempt: {completed}"
    );
    assert_eq!(completed, restored, "one restore test per verified backup");
}
