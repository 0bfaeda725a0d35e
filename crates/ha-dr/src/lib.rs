//! Disaster recovery: encrypted, compressed, verified backups.
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
//! 1 ..= `segment_size` bytes, or 0 only when the whole stream is empty. Since the whole header
//! is the associated data of every segment and the data key is bound to the backup id, a
//! changed header byte, a segment moved, dropped or taken from another backup, and a
//! truncation (at a segment boundary the new last segment was sealed without the last flag)
//! each fail authentication. Readers hold one segment at a time.
//!
//! ## Manifest
//!
//! JSON, in an envelope `{"ha_dr_manifest": 1, "key_id", "hmac_sha256", "manifest"}`; the MAC
//! is HMAC-SHA-256 over the exact bytes of the `manifest` value, with a key derived from the
//! master key by HKDF-SHA-256 (salt `"ha-dr v1 manifest salt"`, info `"ha-dr v1 manifest
//! key"`). The manifest holds: `format_version`, `id`, `kind`, `source` (description),
//! `tags`, `created`, `duration`, `plaintext_bytes`, `stored_bytes`, `plaintext_sha256`,
//! `compression`, `cipher`, `segment_size`, `key_id` and kind-specific `details`.
//!
//! ## Keys
//!
//! A master key is 32 random bytes ([`MasterKey::keygen`] writes a file with mode 0600 and
//! refuses to overwrite; [`MasterKey::from_env`] reads hex or base64). Its id is the first
//! 8 bytes of SHA-256(`"ha-dr key id v1\0"` ‖ key), in hex. A [`KeyRing`] writes with one key
//! and reads with any of several; a backup whose key is not in the ring fails with
//! [`Error::MissingKey`] naming the key id.
//!
//! # Status
//!
//! Built: the format and key ring ([`format`], [`key`], [`manifest`]); the [`BackupStore`]
//! trait, the [`LocalStore`] and the conformance suite ([`testing`]); sources (directory,
//! file, config, PostgreSQL), [`Repository`] backup / list / verify / restore / restore test
//! / prune; retention ([`retention`]).
//!
//! The `ha-dr` binary (keygen, backup, list, verify, restore, prune).
//!
//! Not built (yet): the scheduler and RPO tracking, the benchmark.

pub mod error;
pub mod format;
pub mod key;
pub mod manifest;
pub mod pg;
mod pipeline;
pub mod repo;
pub mod retention;
pub mod source;
pub mod store;
pub mod testing;

pub use error::{Error, Result};
pub use format::{BackupId, FORMAT_VERSION, SEGMENT_SIZE};
pub use key::{KeyId, KeyRing, MasterKey};
pub use manifest::{BackupKind, Compression, Details, Manifest};
pub use pg::PgTools;
pub use repo::{
    Checked, DEFAULT_ZSTD_LEVEL, PruneGroup, PruneReport, Repository, RestoreTarget,
    ScratchPostgres,
};
pub use retention::{Decision, RetentionPolicy};
pub use source::{ConfigSnapshot, Source};
pub use store::{BackupStore, DataWriter, LocalStore};
