//! The conformance suite every [`BackupStore`] runs.
//!
//! Each case is a public function taking the store under test; the
//! [`backup_store_conformance!`](crate::backup_store_conformance) macro turns them into one
//! `#[test]` per case for a store factory, an expression yielding `(store, guard)` where the
//! guard (a temp dir, a server) lives until the case ends:
//!
//! ```
//! mod local_conformance {
//!     ha_dr::backup_store_conformance!({
//!         let dir = tempfile::tempdir().unwrap();
//!         (ha_dr::LocalStore::open(dir.path()).unwrap(), dir)
//!     });
//! }
//! ```

use std::io::{Read, Write};
use std::time::Duration;

use crate::error::Error;
use crate::format::BackupId;
use crate::store::BackupStore;

fn id(text: &str) -> BackupId {
    BackupId::parse(text).expect("valid id")
}

fn write_backup(store: &dyn BackupStore, backup: &BackupId, data: &[u8], manifest: &[u8]) {
    let mut writer = store.create_data(backup).expect("create_data");
    writer.write_all(data).expect("write data");
    writer.commit().expect("commit");
    store.put_manifest(backup, manifest).expect("put_manifest");
}

fn read_data(store: &dyn BackupStore, backup: &BackupId) -> Vec<u8> {
    let mut out = Vec::new();
    store
        .open_data(backup)
        .expect("open_data")
        .read_to_end(&mut out)
        .expect("read data");
    out
}

/// A new store lists nothing, and asking for a manifest is `NotFound`.
pub fn empty_store_lists_nothing(store: &dyn BackupStore) {
    assert_eq!(store.list().expect("list"), Vec::<BackupId>::new());
    let err = store.get_manifest(&id("nope")).expect_err("no manifest");
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

/// Committed data and its manifest read back byte for byte, and the backup is listed.
pub fn committed_backup_round_trips(store: &dyn BackupStore) {
    let backup = id("b-round-trip");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    write_backup(store, &backup, &data, b"{\"m\":1}");
    assert_eq!(store.list().expect("list"), vec![backup.clone()]);
    assert_eq!(read_data(store, &backup), data);
    assert_eq!(store.get_manifest(&backup).expect("manifest"), b"{\"m\":1}");
}

/// Data committed without a manifest does not exist: not listed, no manifest; `cleanup`
/// keeps it while it is young (a backup may still be running) and removes it once old.
pub fn data_without_manifest_is_invisible(store: &dyn BackupStore) {
    let backup = id("b-orphan");
    let mut writer = store.create_data(&backup).expect("create_data");
    writer.write_all(b"orphan").expect("write");
    writer.commit().expect("commit");
    assert!(store.list().expect("list").is_empty());
    assert!(matches!(
        store.get_manifest(&backup),
        Err(Error::NotFound { .. })
    ));
    assert!(
        store
            .cleanup(Duration::from_secs(3600))
            .expect("cleanup")
            .is_empty(),
        "young leftovers are kept"
    );
    assert!(
        !store.cleanup(Duration::ZERO).expect("cleanup").is_empty(),
        "old orphan data is removed"
    );
    assert!(store.cleanup(Duration::ZERO).expect("cleanup").is_empty());
}

/// A writer dropped without commit leaves no backup and nothing for `cleanup` to keep.
pub fn dropped_writer_leaves_nothing(store: &dyn BackupStore) {
    let backup = id("b-dropped");
    let mut writer = store.create_data(&backup).expect("create_data");
    writer.write_all(&[7u8; 100_000]).expect("write");
    drop(writer);
    assert!(store.list().expect("list").is_empty());
    store.cleanup(Duration::ZERO).expect("cleanup");
    assert!(store.cleanup(Duration::ZERO).expect("cleanup").is_empty());
    // The id is free to be written for real.
    write_backup(store, &backup, b"real", b"{}");
    assert_eq!(read_data(store, &backup), b"real");
}

/// `delete` removes the backup (list, manifest and data); deleting again is `NotFound`;
/// other backups are untouched.
pub fn delete_removes_one_backup(store: &dyn BackupStore) {
    let (a, b) = (id("b-del-a"), id("b-del-b"));
    write_backup(store, &a, b"a", b"{\"a\":1}");
    write_backup(store, &b, b"b", b"{\"b\":1}");
    store.delete(&a).expect("delete");
    assert_eq!(store.list().expect("list"), vec![b.clone()]);
    assert!(matches!(
        store.get_manifest(&a),
        Err(Error::NotFound { .. })
    ));
    assert!(store.open_data(&a).is_err(), "data is gone too");
    assert!(matches!(store.delete(&a), Err(Error::NotFound { .. })));
    assert_eq!(read_data(store, &b), b"b");
    assert!(
        store.cleanup(Duration::ZERO).expect("cleanup").is_empty(),
        "delete leaves nothing behind"
    );
}

/// `list` returns every backup, sorted, and nothing else.
pub fn list_is_sorted_and_complete(store: &dyn BackupStore) {
    let ids = [id("c-3"), id("a-1"), id("b-2")];
    for backup in &ids {
        write_backup(store, backup, backup.as_str().as_bytes(), b"{}");
    }
    let mut writer = store.create_data(&id("d-unfinished")).expect("create_data");
    writer.write_all(b"x").expect("write");
    let mut sorted = ids.to_vec();
    sorted.sort();
    assert_eq!(store.list().expect("list"), sorted);
    drop(writer);
}

/// Generates one `#[test]` per conformance case for a store factory: an expression yielding
/// `(store, guard)`, evaluated afresh per case; `store` implements [`BackupStore`] and
/// `guard` lives until the case ends.
#[macro_export]
macro_rules! backup_store_conformance {
    ($make:expr) => {
        $crate::backup_store_conformance!(@cases $make;
            empty_store_lists_nothing,
            committed_backup_round_trips,
            data_without_manifest_is_invisible,
            dropped_writer_leaves_nothing,
            delete_removes_one_backup,
            list_is_sorted_and_complete,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let (store, _guard) = $make;
                $crate::testing::$case(&store);
            }
        )*
    };
}
