//! Compiles against every public path of `ha_replication::files`, so a rename or a lost
//! re-export breaks this test before it breaks a user.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ha_core::Validate;
use ha_replication::files::testing;
use ha_replication::files::{
    DEFAULT_BUFFER_SIZE, DeletionRefusal, DeletionsRefused, EntryMeta, Failure, FileAttrs,
    FileReplicator, FileSyncConfig, FileSyncError, LOCK_NAME, LocalTarget, MANIFEST_NAME,
    MAX_BUFFER_SIZE, MAX_PARALLELISM, MIN_BUFFER_SIZE, Mismatch, Modified, Mtime, ParseSha256Error,
    RESERVED_PREFIX, RefusalReason, Refused, Sha256, SpecialKind, SyncReport, SyncTarget,
    TEMP_PREFIX, TargetLock, VerifyReport, hash_reader,
};

#[test]
fn every_public_path_is_reachable() {
    // Root re-exports name the same types as the module paths.
    let config: ha_replication::FileSyncConfig = FileSyncConfig::default();
    assert!(config.validate().is_ok());
    let dir = tempfile::tempdir().unwrap();
    let target: ha_replication::LocalTarget = LocalTarget::new(dir.path()).with_buffer_size(8192);
    assert_eq!(target.root(), dir.path());
    let replicator: ha_replication::FileReplicator =
        FileReplicator::new(dir.path(), target, config).unwrap();
    let _: &dyn ha_replication::SyncTarget = replicator.target() as &dyn SyncTarget;
    let _: &FileSyncConfig = replicator.config();
    let _: &std::path::Path = replicator.source();
    let _: Option<ha_replication::FileSyncError> = None::<FileSyncError>;
    let _: Option<ha_replication::SyncReport> = None::<SyncReport>;
    let _: Option<ha_replication::FileSync> = None::<ha_replication::files::FileSync>;
    let _ = FileReplicator::local(dir.path(), dir.path(), FileSyncConfig::default()).unwrap();

    let _: Option<(
        VerifyReport,
        DeletionsRefused,
        DeletionRefusal,
        Refused,
        RefusalReason,
    )> = None;
    let _: Option<(
        Failure,
        Modified,
        Mismatch,
        SpecialKind,
        EntryMeta,
        TargetLock,
    )> = None;
    let _ = FileAttrs {
        mode: 0o644,
        mtime: Mtime { secs: 0, nanos: 0 },
    };
    let _: Result<Sha256, ParseSha256Error> = "00".parse();
    let mut buffer = vec![0; DEFAULT_BUFFER_SIZE];
    let (digest, len) = hash_reader(&mut &b"abc"[..], &mut buffer).unwrap();
    assert_eq!((digest, len), (Sha256::of(b"abc"), 3));
    const { assert!(MIN_BUFFER_SIZE < MAX_BUFFER_SIZE && MAX_PARALLELISM > 1) };
    for name in [LOCK_NAME, MANIFEST_NAME, TEMP_PREFIX] {
        assert!(name.starts_with(RESERVED_PREFIX));
    }
    let _: fn(&dyn SyncTarget) = testing::lock_is_exclusive;
    assert_eq!(testing::PAST.nanos, 123_456_789);
    let _ = Duration::ZERO;
}
