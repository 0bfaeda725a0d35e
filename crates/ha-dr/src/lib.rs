//! Disaster recovery: encrypted, compressed, verified backups.
//!
//! A [`Repository`] backs [`Source`]s (a directory tree, a file, a config value, a PostgreSQL
//! database) up into a [`BackupStore`], and verifies, restores and prunes them:
//!
//! ```
//! use ha_dr::{KeyRing, LocalStore, MasterKey, Repository, RestoreTarget, Source};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ha_dr::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! std::fs::write(dir.path().join("app.conf"), "replicas = 3\n").unwrap();
//!
//! let key = MasterKey::keygen(&dir.path().join("backup.key"))?; // 32 random bytes, mode 0600
//! let repo = Repository::new(LocalStore::open(dir.path().join("store"))?, KeyRing::new(key));
//! let backup = repo.backup(&Source::file(dir.path().join("app.conf")), &[]).await?;
//!
//! repo.verify(&backup.id).await?; // every segment, the sizes, the SHA-256
//! let target = dir.path().join("restored.conf");
//! repo.restore(&backup.id, &RestoreTarget::Path(target.clone()), false).await?;
//! assert_eq!(std::fs::read(&target).unwrap(), b"replicas = 3\n");
//! # Ok(()) }
//! ```
//!
//! # The format, version 1
//!
//! A backup is two objects in a [`BackupStore`]: its data and its [`Manifest`]. The manifest
//! is written last; a backup without a manifest does not exist.
//!
//! ## Data
//!
//! The source stream is compressed with zstd (streaming, default level 3, one or more frames),
//! then cut into segments of `segment_size` plaintext bytes (65 536) and sealed with
//! AES-256-GCM in the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015, as in
//! age):
//!
//! ```text
//! header   = magic version compression cipher reserved segment_size salt
//!            key_id_len key_id backup_id_len backup_id
//!   magic        8 bytes  89 48 41 44 52 0D 0A 1A  ("\x89HADR\r\n\x1a")
//!   version      1 byte   1
//!   compression  1 byte   0 none, 1 zstd
//!   cipher       1 byte   1 = AES-256-GCM STREAM, data key by HKDF-SHA-256
//!   reserved     1 byte   0
//!   segment_size 4 bytes  little-endian, 65536 (readers accept 1 KiB ..= 4 MiB)
//!   salt         32 bytes random per backup
//!   key_id       u8 length + ASCII [0-9a-z] (the master key's id)
//!   backup_id    u8 length + ASCII [A-Za-z0-9._-]
//! data     = header segment_0 … segment_n          (n ≥ 0)
//! segment  = AES-256-GCM(data_key, nonce_i, aad = header bytes, plaintext_i) ‖ 16-byte tag
//! nonce_i  = 11-byte big-endian i ‖ last flag (0x01 on the final segment, else 0x00)
//! data_key = HKDF-SHA-256(salt, master key, info = "ha-dr v1 data key\0" ‖ backup_id)
//! ```
//!
//! Every segment but the last holds exactly `segment_size` plaintext bytes; the last holds
//! 1 ..= `segment_size` bytes, or 0 only when the whole stream is empty (readers refuse an
//! empty final segment after full ones). Since the whole header
//! is the associated data of every segment and the data key is bound to the backup id, a
//! changed header byte, a segment moved, dropped or taken from another backup, and a
//! truncation (at a segment boundary the new last segment was sealed without the last flag)
//! each fail authentication. Readers hold one segment at a time.
//!
//! ## Manifest
//!
//! JSON, in an envelope `{"ha_dr_manifest": 2, "key_id", "listing", "salt", "sealed"}`.
//! `listing` is the clear part, what listing and retention need without a key: `id`,
//! `kind`, `source` (description), `created`, `stored_bytes` (the encrypted size, which the
//! store shows anyway) and `key_id` ([`Listing`]). `sealed` (base64) is the whole manifest —
//! `format_version`, `id`, `kind`, `source`, `tags`, `created`, `duration`,
//! `plaintext_bytes`, `stored_bytes`, `plaintext_sha256`, `compression`, `cipher`,
//! `segment_size`, `key_id` and kind-specific `details` (row counts per table, captured
//! environment variable names, file modes, …) — encrypted with AES-256-GCM under
//! HKDF-SHA-256(`salt` (32 random bytes, base64), master key, info `"ha-dr v2 manifest
//! key\0"` ‖ backup id), nonce zero, the exact bytes of `listing` as associated data; the
//! listing must equal the sealed manifest's fields. Version 1 envelopes (`{"ha_dr_manifest":
//! 1, "key_id", "hmac_sha256", "manifest"}`, the manifest in clear, HMAC-SHA-256 under a key
//! derived with salt `"ha-dr v1 manifest salt"` and info `"ha-dr v1 manifest key"`) are still
//! read and authenticated, never written.
//!
//! ## Keys
//!
//! A master key is 32 random bytes ([`MasterKey::keygen`] writes a file with mode 0600 and
//! refuses to overwrite; [`MasterKey::load`] refuses a file its group or others may read or
//! write, naming the file and its mode; a key's bytes are wiped from memory on drop, with the
//! `zeroize` crate; [`MasterKey::from_env`] reads hex or base64). `pg_dump`/`pg_restore` get the
//! database password in `PGPASSWORD`, never in their argv, and never `HA_DR_KEY`. A
//! `LocalStore` creates its directory `0700` and its files `0600`. Its id is the first
//! 8 bytes of SHA-256(`"ha-dr key id v1\0"` ‖ key), in hex. A [`KeyRing`] writes with one key
//! and reads with any of several; a backup whose key is not in the ring fails with
//! [`Error::MissingKey`] naming the key id.
//!
//! # Operations
//!
//! - **Backup** streams the source through SHA-256, zstd (multithreaded: one worker per core by
//!   default, [`Repository::zstd_workers`]) and the segmenter into the store; memory stays
//!   bounded by a few segments and zstd's window, whatever the input size. PostgreSQL is
//!   dumped with `pg_dump -Fc -Z0 --snapshot=…` from a repeatable-read transaction that also
//!   counts every table's rows (recorded in the manifest for restore tests); the exit status
//!   is checked and the child is killed if the backup is abandoned.
//! - **Directory backups** write each file's header from one `stat` of the open file and
//!   exactly that many bytes after it (a file that grows is cut, one that shrinks is padded
//!   with zeros, as GNU tar does; both are listed as `changed` in the manifest). Only entry
//!   types a restore accepts are written: files, directories, symlinks, never sparse
//!   entries; FIFOs, sockets, device nodes and the store's own directory are left out and
//!   listed as `skipped`.
//! - **Verify** means restorable: it authenticates the manifest, reads every segment and
//!   checks the final flag, the stored and plaintext sizes and the SHA-256, and walks the
//!   plaintext as a restore would: every tar header, path, entry type and size, the entry
//!   count against the manifest and zeros only after the archive (directories); the JSON
//!   (configs); the `pg_dump` signature (databases). `ha-dr verify` of every backup fails
//!   (exit 1) on a manifest that does not read or authenticate, and on an empty store.
//! - **Restore** verifies while it streams and writes nothing in place until the whole backup
//!   checked out: directories are extracted beside the target and renamed into place (tar
//!   entries escaping the target are refused; symlinks are restored as links; modes and
//!   mtimes are kept, setuid/setgid masked since owners are not restored; the entry count
//!   must match the manifest), files likewise (their recorded mode; other kinds `0600`);
//!   staging is private (`0700`/`0600`), `flock`ed while in use, and on the target's own
//!   file system: beside the target, or inside it when the target is a mount point (its
//!   entries are then moved in one by one). The next restore in the same place removes the
//!   staging of crashed restores (named `.ha-dr-restore-<secs>-<hex>-<name>`, older than
//!   itself, not locked). A database is restored by `pg_restore` into a
//!   fresh temporary database that is renamed to the target name at the end (and dropped on
//!   any error); temporary database names stay within 63 bytes (the target cut, a hash of it
//!   and the time appended) and are held under an advisory lock, and the next restore on the
//!   server drops those crashed restores left (a replaced database only once its target
//!   exists again). A non-empty directory, an existing file or an existing database is refused
//!   unless `force`; restoring over a database with `force` first takes a safety backup of
//!   it and verifies it, renames the old database aside (renamed back if the restored one
//!   cannot take its place) and drops it only after the swap.
//! - **Restore test** restores into a scratch directory or scratch database, compares entry
//!   or per-table row counts with the manifest, and reports the duration (measured RTO).
//! - **Prune** applies a [`RetentionPolicy`] (restic's calendar buckets, UTC) per source, to
//!   authenticated manifests only (others are reported and left alone, so it needs the
//!   key), and never deletes the newest backup of a source that verifies (the newest this
//!   repository verified, or else the newest that verifies when prune checks).
//! - **Schedule**: a [`BackupScheduler`] backs named sources up on intervals (defaults:
//!   database 4 h, directory/file 24 h, config 24 h) or cron expressions (UTC, parsed by the
//!   `croner` crate), only while a [`ha_core::LeadershipGate`] says this node leads, one run
//!   per source at a time, retrying with [`ha_core::Backoff`]; each backup is verified (or
//!   restore-tested) before it counts for the source's RPO; retention may follow. It tracks
//!   RPO (`RpoBreached` on each transition into breach) and RTO (the last restore test vs its
//!   target, default 15 min) per source: [`BackupScheduler::status`]. It is an
//!   [`ha_core::Component`] (`backups`): built unstarted, started with the node's
//!   [`ha_core::ComponentContext`] (node, bus, leadership gate, shutdown); an admin can run
//!   one backup of a source at once with [`BackupScheduler::backup_now`].
//!
//! - **Point-in-time recovery** ([`pitr`]): `ha-dr wal-push %p` as PostgreSQL's
//!   `archive_command` stores every WAL segment, `.partial`, timeline history and backup
//!   history file as an object `wal-<name>` in the same format and store (durable before
//!   exit 0; the same file again succeeds, other content under its name is refused, never
//!   overwritten; a segment whose page header disagrees with its name is refused). `ha-dr
//!   wal-fetch %f %p` as `restore_command` hands a file over only after all of it
//!   authenticated (temp file and rename; fsynced only with `--fsync`, see
//!   [`WalFetchOptions::fsync`]), exits 1 when the file is not archived and 255
//!   for anything else, so that PostgreSQL aborts recovery instead of taking a corrupt file
//!   for the end of the WAL. `backup --pg-base URL` ([`Source::pg_base`]) streams
//!   `pg_basebackup -D - -Ft -X none` into a backup of kind `pg_base` whose manifest holds the
//!   backup label, the start and stop LSNs, the timeline and the system identifier.
//!   `restore --pg-base ID --to DIR` with `--target-time`, `--target-lsn`, `--target-xid` or
//!   `--latest` first proves the archive holds every segment the target needs (naming the
//!   first missing one), then writes the data directory (`0700`) beside the target with
//!   `recovery.signal`, `restore_command` (this binary's `wal-fetch`, same store and key
//!   file), `recovery_target_timeline = 'latest'` and `recovery_target_action = 'promote'`,
//!   and renames it into place. `verify --chain` proves, for each base backup, that the WAL
//!   from its start to the newest segment of the newest timeline is complete (timeline path
//!   from the history files; each segment read through and of the same cluster). Prune
//!   removes the WAL that no kept base backup needs (never history files). A
//!   [`WalRpoMonitor`] publishes `RpoBreached` (kind `wal`) when the newest archived segment
//!   is older than the RPO (default 5 min).
//!
//! Events: [`ha_core::HaEvent::BackupCompleted`], `BackupFailed` and `RestoreCompleted` when
//! [`Repository::events`] is set; scheduled runs publish their own (one per run, after
//! retries) and `RpoBreached` on the bus of the scheduler's context. Metrics: `ha_dr_backups_total`,
//! `ha_dr_backup_duration_seconds`, `ha_dr_backup_bytes`, `ha_dr_restore_duration_seconds`, and
//! from the scheduler `ha_dr_rpo_seconds`, `ha_dr_backup_last_success_timestamp_seconds`,
//! `ha_dr_backup_skipped_total` (names from [`ha_core::metric`]).
//!
//! # Status
//!
//! Built: everything above, the [`LocalStore`] and its conformance suite ([`testing`]), and
//! the `ha-dr` binary (`keygen`, `backup`, `list [--json]`, `verify [--restore-test |
//! --chain]`, `restore`, `prune [--dry-run]`, `wal-push`, `wal-fetch`), which draws a progress bar (bytes, rate, ETA when the size
//! is known) on stderr when stderr is a terminal, fed by a [`Progress`] counter.
//!
//! The reader is fuzzed by a property test instead of a cargo-fuzz target (cargo-fuzz needs
//! a nightly toolchain): `tests/reader_fuzz.rs` feeds random bytes, truncations, appended
//! bytes and byte flips anywhere in a valid backup's data and manifest to verify and restore
//! and checks that each is an error, never a panic, never output; the tamper battery covers
//! the structured cases (every header byte, segment boundaries, splices).
//!
//! Not built: an object-store `BackupStore`; a cargo-fuzz target;
//! restoring ownership (tar entries carry uid/gid; restore keeps modes and mtimes, not owners,
//! and so masks setuid/setgid); re-sealing version 1 manifests already in a store (they stay
//! readable, in clear); restoring into a target that is itself a mount point is staged
//! inside it but tested only on a plain directory (a mount needs root), and the moving in is
//! not atomic as a whole; a file target that is a bind mount; a `--key-file` for `list`
//! (tags are only shown by commands that open manifests); wiping ring's expanded AES keys;
//! a scheduler daemon in the CLI; for PITR: tablespaces other than the default ones (the
//! base backup is one tar stream to stdout), pushing WAL in parallel or asynchronously, a
//! `ha-node` config section for `pg_base` sources and the WAL RPO monitor; seeding a
//! new leader's RPO from backups already in the store (its clock starts when it begins to
//! lead).

pub mod error;
pub mod format;
pub mod key;
pub mod manifest;
pub mod pg;
mod pipeline;
pub mod pitr;
pub mod progress;
pub mod repo;
pub mod retention;
pub mod schedule;
pub mod source;
mod staging;
pub mod store;
pub mod stream;
pub mod testing;
pub mod wal_rpo;

pub use error::{Error, Result};
pub use format::{BackupId, FORMAT_VERSION, SEGMENT_SIZE};
pub use key::{KeyId, KeyRing, MasterKey};
pub use manifest::{BackupKind, Compression, Details, Listing, Manifest, Skipped};
pub use pg::PgTools;
pub use pitr::{
    ChainReport, Lsn, PitrRestore, RecoveryTarget, WalFetchOptions, WalName, WalPushed,
    segment_name, wal_fetch_command,
};
pub use progress::Progress;
pub use repo::{
    Checked, DEFAULT_ZSTD_LEVEL, PruneGroup, PruneReport, Repository, RestoreTarget,
    ScratchPostgres, Unreadable, zstd_workers_per_core,
};
pub use retention::{Decision, RetentionPolicy};
pub use schedule::{
    BackupRunner, BackupScheduler, BackupSchedulerBuilder, CronSchedule, ScheduleConfig,
    SourceSchedule, SourceStatus, Trigger,
};
pub use source::{ConfigSnapshot, Source};
pub use store::{BackupStore, DataWriter, LocalStore};
pub use stream::{WalStream, WalStreamConfig};
pub use wal_rpo::{WalRpoConfig, WalRpoMonitor, WalRpoStatus};
