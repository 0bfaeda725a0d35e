//! The manifest: what a backup holds, and the proof that it is whole.
//!
//! Stored as a JSON envelope whose `manifest` member is authenticated byte for byte with
//! HMAC-SHA-256 under a key derived from the master key:
//!
//! ```json
//! {"ha_dr_manifest":1,"key_id":"…","hmac_sha256":"…","manifest":{"id":"…", …}}
//! ```
//!
//! The MAC covers the exact bytes of the `manifest` value as stored, so nothing is
//! re-serialised before checking.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use ring::hmac;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::format::{BackupId, FORMAT_VERSION};
use crate::key::{KeyId, KeyRing, MasterKey};

/// What kind of source a backup was taken from.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BackupKind {
    /// A PostgreSQL database, as `pg_dump -Fc` output.
    Postgres,
    /// A directory tree, as a tar stream.
    Dir,
    /// One file's bytes.
    File,
    /// A serialisable config value (and an allow-listed environment snapshot), as JSON.
    Config,
    /// A base backup of a whole PostgreSQL cluster: `pg_basebackup`'s tar stream, restored
    /// with the archived WAL after it to a point in time.
    PgBase,
    /// One file PostgreSQL archived (`archive_command`): a WAL segment, a timeline history
    /// file, a backup history file or a `.partial` segment, stored under id `wal-<name>`.
    Wal,
}

impl BackupKind {
    /// The snake-case name (also the first part of generated ids and the `kind` label).
    pub const fn as_str(self) -> &'static str {
        match self {
            BackupKind::Postgres => "postgres",
            BackupKind::Dir => "dir",
            BackupKind::File => "file",
            BackupKind::Config => "config",
            BackupKind::PgBase => "pg_base",
            BackupKind::Wal => "wal",
        }
    }
}

impl std::fmt::Display for BackupKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the plaintext was compressed.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Compression {
    /// `zstd` or `none`.
    pub algorithm: String,
    /// The zstd level (0 for none).
    pub level: i32,
}

/// Facts about the source, by kind, used by `verify --restore-test`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Details {
    /// Nothing beyond the common fields.
    #[default]
    None,
    /// A directory: how many tar entries (files, directories, symlinks) it held, and what
    /// was not stored as it was.
    Dir {
        /// Tar entries written; every restore and verify checks the archive holds exactly
        /// these.
        entries: u64,
        /// Files that changed (grew, shrank, were rewritten or deleted) while they were
        /// read: stored with the size they had when their header was written (cut or
        /// zero-padded), so they may be inconsistent.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        changed: Vec<String>,
        /// Entries left out, with the reason (FIFOs, sockets, device nodes, the store
        /// itself, files replaced while read).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        skipped: Vec<Skipped>,
    },
    /// A file: its permission bits (`0o777` part) when it was a regular file; a restore
    /// gives them back (other kinds, and files without it, are restored `0600`).
    File {
        /// Permission bits.
        mode: u32,
    },
    /// A database: the exact row count of every table, counted in the same snapshot that
    /// `pg_dump` dumped (`schema.table` → rows).
    Postgres {
        /// Rows per table.
        table_rows: BTreeMap<String, u64>,
    },
    /// A config value: the environment variables that were captured (names only).
    Config {
        /// Captured variable names.
        env: Vec<String>,
    },
    /// A cluster base backup: where its WAL starts and stops, and what identifies the
    /// cluster. A restore needs every WAL segment from `start_lsn` on (to `stop_lsn` at
    /// least, to reach a consistent state).
    PgBase {
        /// Tar entries, checked like a directory backup's.
        entries: u64,
        /// `START WAL LOCATION` of the backup label, `X/Y`.
        start_lsn: String,
        /// The end of the WAL the backup needs (`End-LSN` of the backup manifest), `X/Y`.
        stop_lsn: String,
        /// `START TIMELINE` of the backup label.
        timeline: u32,
        /// The cluster's system identifier (from `global/pg_control`).
        system_identifier: u64,
        /// The backup label as PostgreSQL wrote it.
        label: String,
    },
    /// An archived WAL file.
    Wal {
        /// Its name in `pg_wal` (`000000010000000000000003`, `00000002.history`, ...).
        name: String,
        /// For a segment: the system identifier in its first page header.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        system_identifier: Option<u64>,
    },
}

/// An entry of a directory that a backup left out.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Skipped {
    /// The path, relative to the backed-up directory.
    pub path: String,
    /// Why it was left out.
    pub reason: String,
}

impl Skipped {
    pub(crate) fn new(path: &str, reason: &str) -> Self {
        Self {
            path: path.to_owned(),
            reason: reason.to_owned(),
        }
    }
}

/// Everything known about one backup. Written last: a backup without its manifest does not
/// exist.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Manifest {
    /// The data format version (see [`FORMAT_VERSION`]).
    pub format_version: u8,
    /// The backup's id.
    pub id: BackupId,
    /// The source kind.
    pub kind: BackupKind,
    /// A description of the source (a path, or a database URL without its password).
    pub source: String,
    /// Free-form tags given at backup time.
    #[serde(default)]
    pub tags: Vec<String>,
    /// When the backup started.
    #[serde(with = "humantime_serde")]
    pub created: SystemTime,
    /// How long it took to write.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Bytes of the source stream before compression.
    pub plaintext_bytes: u64,
    /// Bytes of the stored data (header, segments and tags).
    pub stored_bytes: u64,
    /// SHA-256 of the source stream, hex.
    pub plaintext_sha256: String,
    /// How the stream was compressed.
    pub compression: Compression,
    /// The cipher, `aes-256-gcm-stream`.
    pub cipher: String,
    /// Plaintext bytes per segment.
    pub segment_size: u32,
    /// The master key the backup was written with.
    pub key_id: KeyId,
    /// Kind-specific facts.
    #[serde(default)]
    pub details: Details,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    ha_dr_manifest: u8,
    key_id: &'a KeyId,
    hmac_sha256: String,
    manifest: &'a RawValue,
}

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    ha_dr_manifest: u8,
    key_id: KeyId,
    hmac_sha256: String,
    #[serde(borrow)]
    manifest: &'a RawValue,
}

impl Manifest {
    /// The envelope bytes to store: this manifest, authenticated with `key`.
    pub(crate) fn seal(&self, key: &MasterKey) -> Result<Vec<u8>> {
        let err = |e: serde_json::Error| Error::Manifest {
            backup_id: self.id.to_string(),
            detail: e.to_string(),
        };
        let body = serde_json::to_string(self).map_err(err)?;
        let raw = RawValue::from_string(body).map_err(err)?;
        let tag = hmac::sign(&key.manifest_key(), raw.get().as_bytes());
        let mut out = serde_json::to_vec_pretty(&EnvelopeOut {
            ha_dr_manifest: 1,
            key_id: key.id(),
            hmac_sha256: hex::encode(tag.as_ref()),
            manifest: &raw,
        })
        .map_err(err)?;
        out.push(b'\n');
        Ok(out)
    }

    /// Checks the envelope of backup `expected` with the matching key from `keys` and returns
    /// the manifest.
    pub(crate) fn open(bytes: &[u8], expected: &BackupId, keys: &KeyRing) -> Result<Self> {
        let envelope = parse_envelope(bytes, expected)?;
        let key = keys.require(&envelope.key_id, expected.as_str())?;
        let tag = hex::decode(&envelope.hmac_sha256)
            .map_err(|_| Error::corrupt(expected.as_str(), "manifest MAC is not hex"))?;
        hmac::verify(
            &key.manifest_key(),
            envelope.manifest.get().as_bytes(),
            &tag,
        )
        .map_err(|_| Error::corrupt(expected.as_str(), "manifest failed authentication"))?;
        let manifest = body(&envelope, expected)?;
        if manifest.key_id != envelope.key_id {
            return Err(Error::corrupt(
                expected.as_str(),
                "manifest names another key than its envelope",
            ));
        }
        Ok(manifest)
    }

    /// Reads the manifest of backup `expected` without authenticating it (no key needed):
    /// for listing and retention, which trust the store as far as deleting goes anyway.
    pub(crate) fn read_unverified(bytes: &[u8], expected: &BackupId) -> Result<Self> {
        let envelope = parse_envelope(bytes, expected)?;
        body(&envelope, expected)
    }
}

fn parse_envelope<'a>(bytes: &'a [u8], expected: &BackupId) -> Result<EnvelopeIn<'a>> {
    let envelope: EnvelopeIn<'a> = serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(expected.as_str(), format!("manifest is not valid: {e}")))?;
    if envelope.ha_dr_manifest != 1 {
        return Err(Error::UnsupportedFormat {
            backup_id: expected.to_string(),
            detail: format!("manifest envelope version {}", envelope.ha_dr_manifest),
        });
    }
    Ok(envelope)
}

fn body(envelope: &EnvelopeIn<'_>, expected: &BackupId) -> Result<Manifest> {
    let manifest: Manifest = serde_json::from_str(envelope.manifest.get())
        .map_err(|e| Error::corrupt(expected.as_str(), format!("manifest is not valid: {e}")))?;
    if &manifest.id != expected {
        return Err(Error::corrupt(
            expected.as_str(),
            format!("the manifest describes backup {}", manifest.id),
        ));
    }
    if manifest.format_version != FORMAT_VERSION {
        return Err(Error::UnsupportedFormat {
            backup_id: expected.to_string(),
            detail: format!("format version {}", manifest.format_version),
        });
    }
    Ok(manifest)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(id: &str, key: &MasterKey) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            id: BackupId::parse(id).unwrap(),
            kind: BackupKind::File,
            source: "/etc/x".into(),
            tags: vec!["t".into()],
            created: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_millis(1500),
            plaintext_bytes: 10,
            stored_bytes: 100,
            plaintext_sha256: "00".repeat(32),
            compression: Compression {
                algorithm: "zstd".into(),
                level: 3,
            },
            cipher: "aes-256-gcm-stream".into(),
            segment_size: 65536,
            key_id: key.id().clone(),
            details: Details::Dir {
                entries: 3,
                changed: Vec::new(),
                skipped: Vec::new(),
            },
        }
    }

    #[test]
    fn sealed_manifests_open_and_any_change_is_caught() {
        let key = MasterKey::from_bytes([3; 32]);
        let keys = KeyRing::new(key.clone());
        let m = sample("b1", &key);
        let id = m.id.clone();
        let sealed = m.seal(&key).unwrap();
        assert_eq!(Manifest::open(&sealed, &id, &keys).unwrap(), m);
        let text = String::from_utf8(sealed.clone()).unwrap();
        let edited = text.replace("\"plaintext_bytes\":10", "\"plaintext_bytes\":11");
        assert_ne!(edited, text);
        let err = Manifest::open(edited.as_bytes(), &id, &keys).unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");
        // Unverified reading still sees the (edited) values: it is for listing only.
        let read = Manifest::read_unverified(edited.as_bytes(), &id).unwrap();
        assert_eq!(read.plaintext_bytes, 11);
        let other = BackupId::parse("b2").unwrap();
        assert!(Manifest::open(&sealed, &other, &keys).is_err());
        let wrong = KeyRing::new(MasterKey::from_bytes([4; 32]));
        let err = Manifest::open(&sealed, &id, &wrong).unwrap_err();
        assert!(matches!(err, Error::MissingKey { .. }), "{err}");
    }
}
