//! The manifest: what a backup holds, and the proof that it is whole.
//!
//! Stored (version 2) as a JSON envelope with a small clear part for listing and retention
//! and everything else sealed:
//!
//! ```json
//! {"ha_dr_manifest":2,"key_id":"…","listing":{"id":"…","kind":"dir","source":"/srv",
//!  "created":"…","stored_bytes":123,"key_id":"…"},"salt":"<base64>","sealed":"<base64>"}
//! ```
//!
//! `sealed` is the whole [`Manifest`] as JSON, encrypted with AES-256-GCM under a key derived
//! like a data key (HKDF-SHA-256 over a fresh random `salt` and the master key, info
//! `"ha-dr v2 manifest key\0" ‖ backup id`), nonce zero (the key is used once), with the exact
//! bytes of `listing` as associated data: a changed clear field, a sealed part moved to another
//! backup or another listing, or a wrong key each fail to open. The plaintext's SHA-256, its
//! exact size, tags, table names and row counts, captured environment variable names, file
//! modes and the rest of the details are only in the sealed part.
//!
//! Version 1 manifests (the whole manifest in clear, authenticated with HMAC-SHA-256 under a
//! key derived with `"ha-dr v1 manifest key"`) are still read and authenticated; they are
//! never written any more.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use ring::{aead, hmac};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::format::{BackupId, FORMAT_VERSION};
use crate::key::{KeyId, KeyRing, MasterKey, random_array};

/// The envelope version this build writes.
const ENVELOPE_VERSION: u8 = 2;
/// Bytes of the random salt of a sealed manifest.
const MANIFEST_SALT_LEN: usize = 32;

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

/// The clear part of a manifest: what listing and retention need without a key. The rest
/// of the [`Manifest`] is sealed. Trust it only as far as the store: it is authenticated
/// when the manifest is opened with the key, not when it is listed.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Listing {
    /// The backup's id.
    pub id: BackupId,
    /// The source kind.
    pub kind: BackupKind,
    /// A description of the source (a path, or a database URL without its password).
    pub source: String,
    /// When the backup started.
    #[serde(with = "humantime_serde")]
    pub created: SystemTime,
    /// Bytes of the stored (encrypted) data: what the store's own listing shows anyway.
    pub stored_bytes: u64,
    /// The master key the backup was written with.
    pub key_id: KeyId,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    ha_dr_manifest: u8,
    key_id: &'a KeyId,
    listing: &'a RawValue,
    salt: String,
    sealed: String,
}

/// Either version of the envelope, as stored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeIn<'a> {
    ha_dr_manifest: u8,
    key_id: KeyId,
    /// Version 1: the MAC of `manifest`.
    #[serde(default)]
    hmac_sha256: Option<String>,
    /// Version 1: the whole manifest in clear.
    #[serde(borrow, default)]
    manifest: Option<&'a RawValue>,
    /// Version 2: the clear part.
    #[serde(borrow, default)]
    listing: Option<&'a RawValue>,
    /// Version 2: the salt of the sealing key.
    #[serde(default)]
    salt: Option<String>,
    /// Version 2: the whole manifest, sealed.
    #[serde(default)]
    sealed: Option<String>,
}

/// The parts of a version 2 envelope.
struct Sealed<'a> {
    listing: &'a RawValue,
    salt: Vec<u8>,
    sealed: Vec<u8>,
}

impl Manifest {
    /// The clear part of this manifest.
    pub fn listing(&self) -> Listing {
        Listing {
            id: self.id.clone(),
            kind: self.kind,
            source: self.source.clone(),
            created: self.created,
            stored_bytes: self.stored_bytes,
            key_id: self.key_id.clone(),
        }
    }

    /// The envelope bytes to store: the clear listing, and this manifest sealed with `key`.
    pub(crate) fn seal(&self, key: &MasterKey) -> Result<Vec<u8>> {
        let err = |e: serde_json::Error| Error::Manifest {
            backup_id: self.id.to_string(),
            detail: e.to_string(),
        };
        let listing = RawValue::from_string(serde_json::to_string(&self.listing()).map_err(err)?)
            .map_err(err)?;
        let mut body = zeroize::Zeroizing::new(serde_json::to_vec(self).map_err(err)?);
        let salt: [u8; MANIFEST_SALT_LEN] = random_array()?;
        let tag = key
            .manifest_seal_key(&salt, self.id.as_str())
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key([0; aead::NONCE_LEN]),
                aead::Aad::from(listing.get().as_bytes()),
                &mut body,
            )
            .map_err(|_| Error::Manifest {
                backup_id: self.id.to_string(),
                detail: "AES-GCM seal failed".into(),
            })?;
        body.extend_from_slice(tag.as_ref());
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut out = serde_json::to_vec_pretty(&EnvelopeOut {
            ha_dr_manifest: ENVELOPE_VERSION,
            key_id: key.id(),
            listing: &listing,
            salt: b64.encode(salt),
            sealed: b64.encode(&*body),
        })
        .map_err(err)?;
        out.push(b'\n');
        Ok(out)
    }

    /// Authenticates (version 1) or opens (version 2) the envelope of backup `expected` with
    /// the matching key from `keys` and returns the manifest.
    pub(crate) fn open(bytes: &[u8], expected: &BackupId, keys: &KeyRing) -> Result<Self> {
        let envelope = parse_envelope(bytes, expected)?;
        let key = keys.require(&envelope.key_id, expected.as_str())?;
        let manifest = match sealed_parts(&envelope, expected)? {
            None => {
                let (raw, mac) = v1_parts(&envelope, expected)?;
                let tag = hex::decode(mac)
                    .map_err(|_| Error::corrupt(expected.as_str(), "manifest MAC is not hex"))?;
                hmac::verify(&key.manifest_key(), raw.get().as_bytes(), &tag).map_err(|_| {
                    Error::corrupt(expected.as_str(), "manifest failed authentication")
                })?;
                body(raw.get().as_bytes(), expected)?
            }
            Some(parts) => {
                // A listing naming another backup: a copy under another id (it would fail to
                // open below too; this names the original).
                let listing = listing(parts.listing, expected)?;
                let mut sealed = zeroize::Zeroizing::new(parts.sealed);
                let plain = key
                    .manifest_seal_key(&parts.salt, expected.as_str())
                    .open_in_place(
                        aead::Nonce::assume_unique_for_key([0; aead::NONCE_LEN]),
                        aead::Aad::from(parts.listing.get().as_bytes()),
                        &mut sealed,
                    )
                    .map_err(|_| {
                        Error::corrupt(
                            expected.as_str(),
                            "manifest failed authentication (its clear or sealed part was \
                             modified, or it belongs to another backup)",
                        )
                    })?;
                let manifest = body(plain, expected)?;
                if listing != manifest.listing() {
                    return Err(Error::corrupt(
                        expected.as_str(),
                        "the manifest's clear listing disagrees with its sealed part",
                    ));
                }
                manifest
            }
        };
        if manifest.key_id != envelope.key_id {
            return Err(Error::corrupt(
                expected.as_str(),
                "manifest names another key than its envelope",
            ));
        }
        Ok(manifest)
    }

    /// Reads the clear part of the manifest of backup `expected` without authenticating it
    /// (no key needed): for listing, which trusts the store as far as deleting goes anyway.
    pub(crate) fn read_listing(bytes: &[u8], expected: &BackupId) -> Result<Listing> {
        let envelope = parse_envelope(bytes, expected)?;
        match sealed_parts(&envelope, expected)? {
            Some(parts) => listing(parts.listing, expected),
            None => {
                Ok(body(v1_parts(&envelope, expected)?.0.get().as_bytes(), expected)?.listing())
            }
        }
    }
}

fn parse_envelope<'a>(bytes: &'a [u8], expected: &BackupId) -> Result<EnvelopeIn<'a>> {
    let envelope: EnvelopeIn<'a> = serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(expected.as_str(), format!("manifest is not valid: {e}")))?;
    if envelope.ha_dr_manifest != 1 && envelope.ha_dr_manifest != ENVELOPE_VERSION {
        return Err(Error::UnsupportedFormat {
            backup_id: expected.to_string(),
            detail: format!(
                "manifest envelope version {} (this build reads 1 and {ENVELOPE_VERSION})",
                envelope.ha_dr_manifest
            ),
        });
    }
    Ok(envelope)
}

/// The members of a version 2 envelope (`None` for version 1); a member of the other
/// version, or one missing, is an error.
fn sealed_parts<'a>(envelope: &EnvelopeIn<'a>, expected: &BackupId) -> Result<Option<Sealed<'a>>> {
    let corrupt = |detail: &str| Error::corrupt(expected.as_str(), detail);
    if envelope.ha_dr_manifest == 1 {
        if envelope.listing.is_some() || envelope.salt.is_some() || envelope.sealed.is_some() {
            return Err(corrupt("a version 1 manifest with version 2 members"));
        }
        return Ok(None);
    }
    if envelope.manifest.is_some() || envelope.hmac_sha256.is_some() {
        return Err(corrupt("a version 2 manifest with version 1 members"));
    }
    let (Some(listing), Some(salt), Some(sealed)) =
        (envelope.listing, &envelope.salt, &envelope.sealed)
    else {
        return Err(corrupt("manifest lacks its listing, salt or sealed part"));
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let salt = b64
        .decode(salt)
        .ok()
        .filter(|s| s.len() == MANIFEST_SALT_LEN)
        .ok_or_else(|| corrupt("manifest salt is not 32 bytes of base64"))?;
    let sealed = b64
        .decode(sealed)
        .map_err(|_| corrupt("manifest sealed part is not base64"))?;
    Ok(Some(Sealed {
        listing,
        salt,
        sealed,
    }))
}

/// The members of a version 1 envelope.
fn v1_parts<'a, 'b>(
    envelope: &'b EnvelopeIn<'a>,
    expected: &BackupId,
) -> Result<(&'a RawValue, &'b str)> {
    match (envelope.manifest, &envelope.hmac_sha256) {
        (Some(raw), Some(mac)) => Ok((raw, mac.as_str())),
        _ => Err(Error::corrupt(
            expected.as_str(),
            "manifest lacks its body or MAC",
        )),
    }
}

fn listing(raw: &RawValue, expected: &BackupId) -> Result<Listing> {
    let listing: Listing = serde_json::from_str(raw.get()).map_err(|e| {
        Error::corrupt(
            expected.as_str(),
            format!("manifest listing is not valid: {e}"),
        )
    })?;
    if &listing.id != expected {
        return Err(Error::corrupt(
            expected.as_str(),
            format!("the manifest describes backup {}", listing.id),
        ));
    }
    Ok(listing)
}

fn body(bytes: &[u8], expected: &BackupId) -> Result<Manifest> {
    let manifest: Manifest = serde_json::from_slice(bytes)
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

    /// A version 1 envelope, as earlier builds wrote it.
    fn seal_v1(m: &Manifest, key: &MasterKey) -> Vec<u8> {
        let raw = serde_json::to_string(m).unwrap();
        let tag = hmac::sign(&key.manifest_key(), raw.as_bytes());
        format!(
            r#"{{"ha_dr_manifest":1,"key_id":"{}","hmac_sha256":"{}","manifest":{raw}}}"#,
            key.id(),
            hex::encode(tag.as_ref())
        )
        .into_bytes()
    }

    #[test]
    fn sealed_manifests_open_and_any_change_is_caught() {
        let key = MasterKey::from_bytes([3; 32]);
        let keys = KeyRing::new(key.clone());
        let m = sample("b1", &key);
        let id = m.id.clone();
        let sealed = m.seal(&key).unwrap();
        assert_eq!(Manifest::open(&sealed, &id, &keys).unwrap(), m);
        assert_eq!(Manifest::read_listing(&sealed, &id).unwrap(), m.listing());
        // The clear listing is bound to the sealed part.
        let text = String::from_utf8(sealed.clone()).unwrap();
        let edited = text.replace("\"stored_bytes\":100", "\"stored_bytes\":101");
        assert_ne!(edited, text);
        let err = Manifest::open(edited.as_bytes(), &id, &keys).unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");
        // Unverified reading still sees the (edited) values: it is for listing only.
        let read = Manifest::read_listing(edited.as_bytes(), &id).unwrap();
        assert_eq!(read.stored_bytes, 101);
        let other = BackupId::parse("b2").unwrap();
        assert!(Manifest::open(&sealed, &other, &keys).is_err());
        let wrong = KeyRing::new(MasterKey::from_bytes([4; 32]));
        let err = Manifest::open(&sealed, &id, &wrong).unwrap_err();
        assert!(matches!(err, Error::MissingKey { .. }), "{err}");
    }

    /// Finding 6: the clear part of a new manifest holds nothing but the listing: no
    /// plaintext hash or exact size, no tag, table name, row count or environment variable
    /// name; they are all back once opened with the key.
    #[test]
    fn the_clear_part_holds_only_the_listing() {
        let key = MasterKey::from_bytes([3; 32]);
        let mut m = sample("b1", &key);
        m.plaintext_sha256 = "ab".repeat(32);
        m.plaintext_bytes = 987_654_321;
        m.tags = vec!["secret-tag".into()];
        let mut postgres = m.clone();
        postgres.kind = BackupKind::Postgres;
        postgres.details = Details::Postgres {
            table_rows: BTreeMap::from([("public.customer_cards".to_owned(), 424_242)]),
        };
        let mut config = m.clone();
        config.kind = BackupKind::Config;
        config.details = Details::Config {
            env: vec!["PAYMENT_API_TOKEN".into()],
        };
        for m in [m, postgres, config] {
            let sealed = m.seal(&key).unwrap();
            let text = String::from_utf8(sealed.clone()).unwrap();
            for secret in [
                "abababab",
                "987654321",
                "secret-tag",
                "customer_cards",
                "424242",
                "PAYMENT_API_TOKEN",
                "plaintext",
                "details",
            ] {
                assert!(!text.contains(secret), "{secret} in the clear: {text}");
            }
            let envelope: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
            let mut clear: Vec<&str> = envelope["listing"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            clear.sort_unstable();
            assert_eq!(
                clear,
                ["created", "id", "key_id", "kind", "source", "stored_bytes"]
            );
            let keys = KeyRing::new(key.clone());
            assert_eq!(Manifest::open(&sealed, &m.id, &keys).unwrap(), m);
        }
    }

    /// Finding 6: a sealed part that was changed, moved to another backup's envelope or
    /// given another salt does not open.
    #[test]
    fn a_tampered_sealed_part_is_refused() {
        let key = MasterKey::from_bytes([3; 32]);
        let keys = KeyRing::new(key.clone());
        let b1 = sample("b1", &key).seal(&key).unwrap();
        let b2 = sample("b2", &key).seal(&key).unwrap();
        let id = BackupId::parse("b1").unwrap();
        let v1: serde_json::Value = serde_json::from_slice(&b1).unwrap();
        let v2: serde_json::Value = serde_json::from_slice(&b2).unwrap();
        let sealed = v1["sealed"].as_str().unwrap();
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .unwrap();
        let mut cases = Vec::new();
        for i in [0, raw.len() / 2, raw.len() - 1] {
            raw[i] ^= 1;
            let mut e = v1.clone();
            e["sealed"] = base64::engine::general_purpose::STANDARD
                .encode(&raw)
                .into();
            raw[i] ^= 1;
            cases.push((format!("byte {i} flipped"), e));
        }
        let mut moved = v1.clone();
        moved["sealed"] = v2["sealed"].clone();
        moved["salt"] = v2["salt"].clone();
        cases.push(("b2's sealed part".into(), moved));
        let mut salted = v1.clone();
        salted["salt"] = v2["salt"].clone();
        cases.push(("another salt".into(), salted));
        let mut cut = v1.clone();
        cut["sealed"] = base64::engine::general_purpose::STANDARD
            .encode(&raw[..raw.len() - 1])
            .into();
        cases.push(("cut short".into(), cut));
        for (case, envelope) in cases {
            let bytes = serde_json::to_vec(&envelope).unwrap();
            let err = Manifest::open(&bytes, &id, &keys).expect_err(&case);
            assert!(err.is_corruption(), "{case}: {err}");
        }
    }

    /// Old manifests stay readable: a version 1 envelope (clear, HMAC'd) opens with the key,
    /// lists without it, and an edit is still caught.
    #[test]
    fn version_1_manifests_are_still_read() {
        let key = MasterKey::from_bytes([3; 32]);
        let keys = KeyRing::new(key.clone());
        let m = sample("b1", &key);
        let v1 = seal_v1(&m, &key);
        assert_eq!(Manifest::open(&v1, &m.id, &keys).unwrap(), m);
        assert_eq!(Manifest::read_listing(&v1, &m.id).unwrap(), m.listing());
        let edited = String::from_utf8(v1)
            .unwrap()
            .replace("\"plaintext_bytes\":10", "\"plaintext_bytes\":11");
        let err = Manifest::open(edited.as_bytes(), &m.id, &keys).unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");
        let future = br#"{"ha_dr_manifest":3,"key_id":"ab"}"#;
        let err = Manifest::open(future, &m.id, &keys).unwrap_err();
        assert!(matches!(err, Error::UnsupportedFormat { .. }), "{err}");
    }
}
