//! The built-in `LocalTarget` passes the `SyncTarget` conformance suite.

#![allow(clippy::unwrap_used)]

mod local_target {
    ha_replication::sync_target_conformance!({
        let dir = tempfile::tempdir().unwrap();
        (ha_replication::files::LocalTarget::new(dir.path()), dir)
    });
}
