//! Round trips of files, directory trees and config values through the whole pipeline, and
//! what restore refuses.

mod common;

use std::fs;

use ha_core::{EventBus, HaEvent, NodeId};
use ha_dr::{
    BackupKind, Details, Error, KeyRing, MasterKey, Repository, RestoreTarget, RetentionPolicy,
    Source,
};

#[tokio::test]
async fn dir_round_trip_keeps_content_links_modes_and_mtimes() {
    let (repo, dir) = common::repo(1);
    let src = dir.path().join("src");
    common::sample_tree(&src);
    let m = repo
        .backup(&Source::dir(&src), &["nightly".into()])
        .await
        .unwrap();
    assert_eq!(m.kind, BackupKind::Dir);
    assert_eq!(m.tags, ["nightly"]);
    assert!(
        matches!(m.details, Details::Dir { entries: 11, .. }),
        "{:?}",
        m.details
    );
    let out = dir.path().join("out");
    repo.restore(&m.id, &RestoreTarget::Path(out.clone()), false)
        .await
        .unwrap();
    assert_eq!(common::describe_tree(&out), common::describe_tree(&src));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&out).unwrap().permissions().mode() & 0o7777,
        fs::metadata(&src).unwrap().permissions().mode() & 0o7777,
        "the root's mode comes back too"
    );
    // Links are stored as links: the outside one points where it pointed, unfollowed.
    assert_eq!(
        fs::read_link(out.join("link-out")).unwrap().to_str(),
        Some("/etc/passwd")
    );
    assert_eq!(
        common::names(dir.path()),
        ["out", "src", "store"],
        "no temp dirs left"
    );
}

#[tokio::test]
async fn file_and_empty_file_round_trip_byte_for_byte() {
    let (repo, dir) = common::repo(1);
    for (name, data) in [
        ("big", common::noise(1_000_000, 7)),
        ("empty", Vec::new()),
        ("exact", vec![b'x'; 64 * 1024 * 3]),
    ] {
        let path = dir.path().join(name);
        fs::write(&path, &data).unwrap();
        let m = repo.backup(&Source::file(&path), &[]).await.unwrap();
        assert_eq!(m.plaintext_bytes, data.len() as u64);
        repo.verify(&m.id).await.unwrap();
        let out = dir.path().join(format!("{name}.out"));
        repo.restore(&m.id, &RestoreTarget::Path(out.clone()), false)
            .await
            .unwrap();
        assert_eq!(fs::read(&out).unwrap(), data, "{name}");
    }
}

#[tokio::test]
async fn config_round_trip_captures_allow_listed_env_only() {
    let (repo, dir) = common::repo(1);
    let value = serde_json::json!({"listen": "0.0.0.0:80", "replicas": 3});
    let source = Source::config("app", &value, &["PATH", "HA_DR_TEST_SURELY_UNSET"]).unwrap();
    let m = repo.backup(&source, &[]).await.unwrap();
    assert_eq!(
        m.details,
        Details::Config {
            env: vec!["PATH".into()]
        }
    );
    let out = dir.path().join("app.json");
    repo.restore(&m.id, &RestoreTarget::Path(out.clone()), false)
        .await
        .unwrap();
    let back: ha_dr::ConfigSnapshot = serde_json::from_slice(&fs::read(&out).unwrap()).unwrap();
    assert_eq!(back.value, value);
    assert_eq!(back.env.keys().collect::<Vec<_>>(), ["PATH"]);
    assert!(
        !back.env.contains_key("HOME"),
        "not allow-listed, not captured"
    );
}

#[tokio::test]
async fn restore_refuses_data_at_the_target_unless_forced() {
    let (repo, dir) = common::repo(1);
    let src = dir.path().join("src");
    common::sample_tree(&src);
    let m = repo.backup(&Source::dir(&src), &[]).await.unwrap();

    // An existing empty directory is fine.
    let empty = dir.path().join("empty-target");
    fs::create_dir(&empty).unwrap();
    repo.restore(&m.id, &RestoreTarget::Path(empty.clone()), false)
        .await
        .unwrap();
    assert_eq!(common::describe_tree(&empty), common::describe_tree(&src));

    // A non-empty one is refused and untouched, then replaced with force.
    let busy = dir.path().join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("precious"), b"keep me").unwrap();
    let err = repo
        .restore(&m.id, &RestoreTarget::Path(busy.clone()), false)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TargetNotEmpty { .. }), "{err}");
    assert_eq!(fs::read(busy.join("precious")).unwrap(), b"keep me");
    repo.restore(&m.id, &RestoreTarget::Path(busy.clone()), true)
        .await
        .unwrap();
    assert_eq!(common::describe_tree(&busy), common::describe_tree(&src));

    // An existing file is refused for a file backup.
    let file = dir.path().join("f");
    fs::write(&file, b"old").unwrap();
    let fm = repo.backup(&Source::file(&file), &[]).await.unwrap();
    let err = repo
        .restore(&fm.id, &RestoreTarget::Path(file.clone()), false)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TargetNotEmpty { .. }), "{err}");
    repo.restore(&fm.id, &RestoreTarget::Path(file.clone()), true)
        .await
        .unwrap();
    assert_eq!(fs::read(&file).unwrap(), b"old");
    let leftovers: Vec<String> = common::names(dir.path())
        .into_iter()
        .filter(|n| n.starts_with(".ha-dr"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn rotated_keys_read_old_backups_and_write_with_the_new_one() {
    let (old_repo, dir) = common::repo(1);
    let file = dir.path().join("f");
    fs::write(&file, b"data").unwrap();
    let old = old_repo.backup(&Source::file(&file), &[]).await.unwrap();
    let ring =
        KeyRing::new(MasterKey::from_bytes([2; 32])).with_reader(MasterKey::from_bytes([1; 32]));
    let repo = Repository::with_store(old_repo.store().clone(), ring.clone());
    repo.verify(&old.id).await.unwrap();
    let new = repo.backup(&Source::file(&file), &[]).await.unwrap();
    assert_eq!(&new.key_id, ring.writer().id());
    let err = old_repo.verify(&new.id).await.unwrap_err();
    assert!(matches!(err, Error::MissingKey { .. }), "{err}");
    assert!(
        err.to_string().contains(ring.writer().id().as_str()),
        "{err}"
    );
}

#[tokio::test]
async fn restore_test_measures_rto_and_events_are_published() {
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let (repo, dir) = common::repo(1);
    let repo = repo.events(bus.clone(), NodeId::new("n1"));
    let src = dir.path().join("src");
    common::sample_tree(&src);
    let m = repo.backup(&Source::dir(&src), &[]).await.unwrap();
    let checked = repo.restore_test(&m.id, None).await.unwrap();
    assert_eq!(checked.detail, "11 entries restored");
    assert!(checked.duration > std::time::Duration::ZERO);
    match events.recv().await.unwrap() {
        HaEvent::BackupCompleted {
            backup_id,
            kind,
            bytes,
            ..
        } => {
            assert_eq!(backup_id, m.id.as_str());
            assert_eq!(kind, "dir");
            assert_eq!(bytes, m.stored_bytes);
        }
        other => panic!("{other:?}"),
    }
    match events.recv().await.unwrap() {
        HaEvent::RestoreCompleted {
            backup_id,
            duration,
            ..
        } => {
            assert_eq!(backup_id, m.id.as_str());
            assert_eq!(duration, checked.duration);
        }
        other => panic!("{other:?}"),
    }
    let err = repo
        .backup(&Source::dir(dir.path().join("missing")), &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(matches!(
        events.recv().await.unwrap(),
        HaEvent::BackupFailed { .. }
    ));
}

#[tokio::test]
async fn prune_dry_run_deletes_nothing_and_prune_keeps_the_newest() {
    let (repo, dir) = common::repo(1);
    let file = dir.path().join("f");
    fs::write(&file, b"data").unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(repo.backup(&Source::file(&file), &[]).await.unwrap().id);
    }
    let policy = RetentionPolicy {
        keep_last: 2,
        ..RetentionPolicy::default()
    };
    let report = repo.prune(&policy, true).await.unwrap();
    assert!(report.removed.is_empty());
    assert_eq!(report.groups.len(), 1);
    let doomed: Vec<_> = report.groups[0]
        .decisions
        .iter()
        .filter(|d| !d.keep)
        .collect();
    assert_eq!(doomed.len(), 1);
    assert_eq!(repo.list().await.unwrap().len(), 3);
    let report = repo.prune(&policy, false).await.unwrap();
    assert_eq!(report.removed, [doomed[0].id.clone()]);
    let left: Vec<_> = repo
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(left.len(), 2);
    assert!(
        left.contains(&ids[2])
            || left
                .iter()
                .any(|id| id == &report.groups[0].decisions[0].id)
    );
}
