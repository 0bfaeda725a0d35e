//! Point-in-time recovery for PostgreSQL: WAL archiving (`wal-push` as `archive_command`,
//! `wal-fetch` as `restore_command`), whole-cluster base backups through `pg_basebackup`,
//! restoring a data directory set up to recover to a target, and the WAL chain check.
//!
//! Every archived WAL file is an object of its own in the same store and format as any
//! backup (zstd, AES-256-GCM STREAM, an authenticated manifest written last), under the id
//! `wal-<name>`: a segment is archived once its manifest is durable, and a fetch hands a
//! file over only after every byte of it authenticated.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use ring::digest;
use serde::Serialize;

use crate::error::{Error, Result, from_io};
use crate::format::BackupId;
use crate::key::{KeyRing, random_array};
use crate::manifest::{BackupKind, Details, Manifest};
use crate::pg::{ChildGuard, PgTools};
use crate::pipeline::{BackupReader, BackupWriter, Compress, copy_large, read_ahead, write_object};
use crate::progress::Progress;
use crate::repo::{Checked, Repository, check_target, extract_tree, sync_tree};
use crate::source;
use crate::staging::{self, Staging};
use crate::store::BackupStore;

/// The id prefix of archived WAL files.
const WAL_PREFIX: &str = "wal-";
/// The manifest `source` of archived WAL.
const WAL_SOURCE: &str = "pg_wal";
/// WAL segment sizes PostgreSQL allows (`initdb --wal-segsize`): powers of two in this range.
const SEGMENT_SIZES: std::ops::RangeInclusive<u64> = (1 << 20)..=(1 << 30);
/// The segment size assumed when the store holds no segment to learn it from.
const DEFAULT_WAL_SEGMENT_SIZE: u64 = 16 << 20;
/// A backup manifest larger than this (about 100 bytes per file) is refused.
const MAX_BACKUP_MANIFEST: u64 = 256 << 20;

/// A WAL position, printed by PostgreSQL as `X/Y` (high and low 32 bits in hex).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let err = || ha_core::ConfigError::new("lsn", format!("{s:?} is not an LSN (X/Y in hex)"));
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |part: &str| {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(part, 16).map_err(|_| err())
        };
        Ok(Lsn((u64::from(half(hi)?) << 32) | u64::from(half(lo)?)))
    }
}

/// The name of a file PostgreSQL archives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalName {
    /// A complete segment, `TTTTTTTTXXXXXXXXYYYYYYYY`.
    Segment {
        /// Timeline.
        timeline: u32,
        /// The high part of the segment number (`XXXXXXXX`).
        log: u32,
        /// The low part (`YYYYYYYY`).
        seg: u32,
    },
    /// The last, incomplete segment of a timeline left at a promotion, `<segment>.partial`.
    Partial {
        /// Timeline.
        timeline: u32,
        /// High part of the segment number.
        log: u32,
        /// Low part.
        seg: u32,
    },
    /// A timeline history file, `TTTTTTTT.history`.
    History {
        /// The timeline it leads to.
        timeline: u32,
    },
    /// A segment as `ha-dr wal-stream` had received it so far, `<segment>.stream.EEEEEEEE`
    /// (`E`: the offset just past its last non-zero byte, in hex). Never PostgreSQL's own
    /// name and never confused with a complete segment: `wal-fetch` hands one over only when
    /// asked to (`--partial`, which `restore --latest` writes into its `restore_command`) and
    /// only when the complete segment is not archived.
    Streamed {
        /// Timeline.
        timeline: u32,
        /// High part of the segment number.
        log: u32,
        /// Low part.
        seg: u32,
        /// How many bytes of the segment it holds (the rest is zeros).
        end: u32,
    },
    /// A backup history file, `<segment>.XXXXXXXX.backup`.
    BackupHistory {
        /// Timeline.
        timeline: u32,
        /// High part of the segment number.
        log: u32,
        /// Low part.
        seg: u32,
    },
}

fn hex8(text: &str) -> Option<u32> {
    // PostgreSQL writes upper case; one spelling per file keeps one object per file.
    (text.len() == 8 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')))
        .then(|| u32::from_str_radix(text, 16).ok())
        .flatten()
}

fn segment_parts(text: &str) -> Option<(u32, u32, u32)> {
    if text.len() != 24 {
        return None;
    }
    Some((hex8(&text[..8])?, hex8(&text[8..16])?, hex8(&text[16..])?))
}

impl WalName {
    /// Parses a file name; `None` for anything PostgreSQL does not archive.
    pub fn parse(name: &str) -> Option<Self> {
        if let Some((timeline, log, seg)) = segment_parts(name) {
            return Some(WalName::Segment { timeline, log, seg });
        }
        if let Some(stem) = name.strip_suffix(".partial") {
            let (timeline, log, seg) = segment_parts(stem)?;
            return Some(WalName::Partial { timeline, log, seg });
        }
        if let Some((stem, end)) = name.split_once(".stream.") {
            let (timeline, log, seg) = segment_parts(stem)?;
            let end = hex8(end)?;
            return Some(WalName::Streamed {
                timeline,
                log,
                seg,
                end,
            });
        }
        if let Some(stem) = name.strip_suffix(".history") {
            return Some(WalName::History {
                timeline: hex8(stem)?,
            });
        }
        if let Some(stem) = name.strip_suffix(".backup") {
            let (segment, offset) = stem.split_once('.')?;
            hex8(offset)?;
            let (timeline, log, seg) = segment_parts(segment)?;
            return Some(WalName::BackupHistory { timeline, log, seg });
        }
        None
    }

    /// `(timeline, log, seg)` of a segment, `.partial`, streamed partial or backup
    /// history file.
    pub(crate) fn parts(&self) -> Option<(u32, u32, u32)> {
        match *self {
            WalName::Segment { timeline, log, seg }
            | WalName::Partial { timeline, log, seg }
            | WalName::Streamed {
                timeline, log, seg, ..
            }
            | WalName::BackupHistory { timeline, log, seg } => Some((timeline, log, seg)),
            WalName::History { .. } => None,
        }
    }

    /// The segment number of a segment or partial segment, for segments of `segment_size`.
    fn segno(&self, segment_size: u64) -> Option<(u32, u64)> {
        match *self {
            WalName::Segment { timeline, log, seg }
            | WalName::Partial { timeline, log, seg }
            | WalName::Streamed {
                timeline, log, seg, ..
            }
            | WalName::BackupHistory { timeline, log, seg } => {
                let per_log = 0x1_0000_0000 / segment_size;
                (u64::from(seg) < per_log)
                    .then(|| (timeline, u64::from(log) * per_log + u64::from(seg)))
            }
            _ => None,
        }
    }
}

/// The name of segment `segno` on `timeline`.
pub fn segment_name(timeline: u32, segno: u64, segment_size: u64) -> String {
    let per_log = 0x1_0000_0000 / segment_size;
    format!(
        "{timeline:08X}{:08X}{:08X}",
        segno / per_log,
        segno % per_log
    )
}

fn wal_id(name: &str) -> Result<BackupId> {
    BackupId::parse(&format!("{WAL_PREFIX}{name}"))
}

fn bad_name(name: &str) -> Error {
    ha_core::ConfigError::new(
        "wal file",
        format!(
            "{name:?} is not the name of a WAL segment, .partial segment, timeline history or \
             backup history file"
        ),
    )
    .into()
}

/// What [`Repository::wal_push`] did.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum WalPushed {
    /// The file is archived now (data and manifest durable).
    Stored(Manifest),
    /// The same file, byte for byte, was archived before; nothing was written.
    AlreadyArchived(Manifest),
}

/// Where a point-in-time restore stops replaying WAL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// Every archived commit (to the end of the archived WAL of the newest timeline).
    Latest,
    /// The last commit at or before this time (`recovery_target_time`).
    Time(SystemTime),
    /// This WAL position (`recovery_target_lsn`).
    Lsn(Lsn),
    /// Up to and including this transaction (`recovery_target_xid`).
    Xid(u64),
}

impl RecoveryTarget {
    /// Parses a time given as RFC 3339 (`2026-01-02T03:04:05.123Z`, any offset) or as
    /// PostgreSQL prints it (`2026-01-02 03:04:05.123456+00`).
    pub fn parse_time(text: &str) -> Result<Self> {
        let parsed = chrono::DateTime::parse_from_rfc3339(text)
            .or_else(|_| chrono::DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z"))
            .map_err(|e| {
                ha_core::ConfigError::new(
                    "target-time",
                    format!("{text:?} is not a time with an offset (RFC 3339): {e}"),
                )
            })?;
        Ok(RecoveryTarget::Time(SystemTime::from(parsed)))
    }

    /// The `recovery_target_*` lines of `postgresql.auto.conf`.
    fn settings(&self) -> Vec<(&'static str, String)> {
        match self {
            RecoveryTarget::Latest => Vec::new(),
            RecoveryTarget::Time(t) => vec![
                (
                    "recovery_target_time",
                    chrono::DateTime::<chrono::Utc>::from(*t)
                        .format("%Y-%m-%d %H:%M:%S%.6f+00")
                        .to_string(),
                ),
                ("recovery_target_action", "promote".into()),
            ],
            RecoveryTarget::Lsn(lsn) => vec![
                ("recovery_target_lsn", lsn.to_string()),
                ("recovery_target_action", "promote".into()),
            ],
            RecoveryTarget::Xid(xid) => vec![
                ("recovery_target_xid", xid.to_string()),
                ("recovery_target_action", "promote".into()),
            ],
        }
    }
}

/// How a restored data directory recovers.
#[derive(Clone, Debug)]
pub struct PitrRestore {
    /// Where recovery stops.
    pub target: RecoveryTarget,
    /// The `restore_command` PostgreSQL runs to fetch archived WAL (`%f`, `%p`), e.g.
    /// [`wal_fetch_command`].
    pub restore_command: String,
}

/// How [`Repository::wal_fetch_with`] hands a WAL file over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WalFetchOptions {
    /// A segment that is not archived is served from the newest partial `wal-stream`
    /// stored of it ([`WalName::Streamed`], zero-padded to the segment's size, which
    /// PostgreSQL reads as the end of the WAL). Only for the end of a recovery to the latest
    /// commit: a standby served a partial while the complete segment is still to come would
    /// stop at the gap.
    pub partial: bool,
    /// fsync the file before it is renamed into place. Off by default: the destination of a
    /// `restore_command` is PostgreSQL's scratch copy. It reads the file at once, fsyncs what
    /// it keeps itself (`durable_rename` when it keeps a restored segment in `pg_wal`), and
    /// after a crash recovery fetches the file again. pgBackRest's `archive-get` does not
    /// fsync it either. The rename stays: the file appears whole or not at all.
    pub fsync: bool,
}

impl WalFetchOptions {
    /// With [`partial`](Self::partial) set to `partial`.
    #[must_use]
    pub fn partial(mut self, partial: bool) -> Self {
        self.partial = partial;
        self
    }

    /// With [`fsync`](Self::fsync) set to `fsync`.
    #[must_use]
    pub fn fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }
}

/// A `restore_command` that runs `ha-dr wal-fetch` at `exe` on `store` with `key_files`
/// (none: the server's environment must hold `HA_DR_KEY`). Paths are shell-quoted and their
/// `%` doubled. `partial`: add `--partial`, so that a segment missing from the archive is
/// served from the newest partial `wal-stream` stored of it (for [`RecoveryTarget::Latest`]
/// only, where the end of the streamed WAL is the end of recovery).
pub fn wal_fetch_command(
    exe: &Path,
    store: &Path,
    key_files: &[(&str, &Path)],
    partial: bool,
) -> String {
    fn quote(path: &Path) -> String {
        let text = path.display().to_string().replace('%', "%%");
        format!("'{}'", text.replace('\'', "'\\''"))
    }
    let mut command = format!("{} wal-fetch --store {}", quote(exe), quote(store));
    for (flag, path) in key_files {
        command.push_str(&format!(" --{flag} {}", quote(path)));
    }
    if partial {
        command.push_str(" --partial");
    }
    command.push_str(" %f %p");
    command
}

/// The WAL a base backup needs, found complete.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct ChainReport {
    /// The base backup.
    pub base: BackupId,
    /// The first segment it needs.
    pub first: String,
    /// The newest segment of the chain.
    pub last: String,
    /// Segments from `first` to `last`, all present and verified.
    pub segments: u64,
    /// The timelines the chain follows, oldest first.
    pub timelines: Vec<u32>,
}

/// Reads through to `inner` and copies every byte read into `out`: the tar scan of a base
/// backup sees exactly the bytes stored.
struct Tee<'a, R> {
    inner: R,
    out: &'a mut BackupWriter,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// What the tar stream of `pg_basebackup` says about the backup.
#[derive(Default)]
struct BaseFacts {
    entries: u64,
    label: Option<String>,
    manifest: Option<Vec<u8>>,
    system_identifier: Option<u64>,
}

fn normalized(path: &Path) -> String {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Walks the base backup's tar stream with the restore's entry rules, keeping the backup
/// label, the backup manifest and the system identifier.
fn scan_base_tar(id: &str, input: &mut dyn Read) -> Result<BaseFacts> {
    let read_err = |e: io::Error| from_io(e, || format!("read pg_basebackup stream of {id}"));
    let mut facts = BaseFacts::default();
    let mut archive = tar::Archive::new(input);
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let path = entry.path().map_err(read_err)?.into_owned();
        source::check_entry(id, &entry, &path)?;
        facts.entries += 1;
        let size = entry.size();
        let name = normalized(&path);
        match name.as_str() {
            "backup_label" => {
                let mut text = String::new();
                entry.read_to_string(&mut text).map_err(read_err)?;
                facts.label = Some(text);
            }
            "backup_manifest" => {
                if size > MAX_BACKUP_MANIFEST {
                    return Err(Error::Command {
                        program: "pg_basebackup".into(),
                        detail: format!("a backup manifest of {size} bytes"),
                    });
                }
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).map_err(read_err)?;
                facts.manifest = Some(bytes);
            }
            "global/pg_control" => {
                let mut sysid = [0u8; 8];
                entry.read_exact(&mut sysid).map_err(read_err)?;
                facts.system_identifier = Some(u64::from_le_bytes(sysid));
            }
            _ => {}
        }
        copy_large(&mut entry, &mut io::sink()).map_err(read_err)?;
    }
    source::drain_zeros(id, archive.into_inner())?;
    Ok(facts)
}

/// `(start LSN, start timeline)` from a backup label.
fn parse_label(label: &str) -> Option<(Lsn, u32)> {
    let field = |key: &str| {
        label
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .map(str::trim)
    };
    let start = field("START WAL LOCATION:")?.split_whitespace().next()?;
    let timeline = field("START TIMELINE:")?.parse().ok()?;
    Some((start.parse().ok()?, timeline))
}

/// The end of the WAL a backup needs: the last `End-LSN` of the backup manifest's
/// `WAL-Ranges`.
fn parse_stop(manifest: &[u8]) -> Option<Lsn> {
    let value: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    let ranges = value.get("WAL-Ranges")?.as_array()?;
    ranges
        .iter()
        .filter_map(|r| r.get("End-LSN")?.as_str()?.parse::<Lsn>().ok())
        .max()
}

/// One timeline history file: `(parent timeline, switch point)` per line, oldest first.
fn parse_history(text: &str) -> Option<Vec<(u32, Lsn)>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let parent = fields.next()?.parse().ok()?;
        let switch = fields.next()?.parse().ok()?;
        out.push((parent, switch));
    }
    Some(out)
}

/// The SHA-256 (hex) and length of a file's bytes.
fn file_digest(path: &Path) -> Result<(String, u64)> {
    let mut file = fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut sha = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("read", path, e)),
        };
        sha.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(sha.finish().as_ref()), total))
}

/// What a push archives: a file PostgreSQL named, or bytes held in memory (a snapshot of
/// the segment `wal-stream` is receiving).
enum WalInput<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

impl WalInput<'_> {
    fn describe(&self, name: &str) -> String {
        match self {
            WalInput::File(path) => path.display().to_string(),
            WalInput::Bytes(_) => format!("{name} (streamed)"),
        }
    }

    fn len(&self) -> Result<u64> {
        match self {
            WalInput::File(path) => Ok(fs::metadata(path)
                .map_err(|e| Error::io("stat", path, e))?
                .len()),
            WalInput::Bytes(bytes) => Ok(bytes.len() as u64),
        }
    }

    fn digest(&self) -> Result<(String, u64)> {
        match self {
            WalInput::File(path) => file_digest(path),
            WalInput::Bytes(bytes) => Ok((
                hex::encode(digest::digest(&digest::SHA256, bytes).as_ref()),
                bytes.len() as u64,
            )),
        }
    }

    fn header(&self) -> Result<[u8; 40]> {
        let mut header = [0u8; 40];
        match self {
            WalInput::File(path) => fs::File::open(path)
                .and_then(|mut f| f.read_exact(&mut header))
                .map_err(|e| Error::io("read", path, e))?,
            WalInput::Bytes(bytes) => {
                let Some(first) = bytes.get(..40) else {
                    return Err(Error::Unsupported(
                        "a streamed segment under 40 bytes".into(),
                    ));
                };
                header.copy_from_slice(first);
            }
        }
        Ok(header)
    }
}

/// Checks a segment's first page header against its name and size: the page address is
/// the segment's start, the recorded segment size is the file's. Returns the system
/// identifier. (The long page header: magic u16, info u16, timeline u32, page address u64,
/// remaining length u32, padding, system identifier u64, segment size u32, block size u32;
/// little-endian on the machines this runs on.)
fn check_segment(input: &WalInput<'_>, raw_name: &str, name: &WalName, len: u64) -> Result<u64> {
    let refuse = |detail: String| {
        Error::Config(ha_core::ConfigError::new(
            "wal file",
            format!(
                "{} is not a WAL segment: {detail}",
                input.describe(raw_name)
            ),
        ))
    };
    if !SEGMENT_SIZES.contains(&len) || !len.is_power_of_two() {
        return Err(refuse(format!(
            "{len} bytes (segments are a power of two of 1 MiB to 1 GiB)"
        )));
    }
    let header = input.header()?;
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let page_address = u64_at(8);
    let system_identifier = u64_at(24);
    let recorded = u64::from(u32::from_le_bytes([
        header[32], header[33], header[34], header[35],
    ]));
    let Some((_, segno)) = name.segno(len) else {
        return Err(refuse("segment number out of range".into()));
    };
    if recorded != len {
        return Err(refuse(format!(
            "its header records a segment size of {recorded} bytes, the file has {len}"
        )));
    }
    if page_address != segno * len {
        return Err(refuse(format!(
            "its first page is at {}, the name says {}",
            Lsn(page_address),
            Lsn(segno * len)
        )));
    }
    Ok(system_identifier)
}

/// Archives the file at `path` (blocking).
fn push_blocking(
    store: &dyn BackupStore,
    keys: &KeyRing,
    compress: Compress,
    path: &Path,
) -> Result<WalPushed> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| bad_name(&path.display().to_string()))?
        .to_owned();
    push_input(store, keys, compress, &name, &WalInput::File(path))
}

/// Archives `input` as WAL file `name` (blocking).
fn push_input(
    store: &dyn BackupStore,
    keys: &KeyRing,
    compress: Compress,
    name: &str,
    input: &WalInput<'_>,
) -> Result<WalPushed> {
    let parsed = WalName::parse(name).ok_or_else(|| bad_name(name))?;
    let id = wal_id(name)?;
    // Two writers of one name (say two clusters set up with one store) must not both find
    // it absent and both write: on a local store, check and write run under a lock.
    let _lock = store.local_dir().map(lock_pushes).transpose()?;
    match store.get_manifest(&id) {
        Ok(bytes) => {
            // Archived before (PostgreSQL retries a push whose exit it did not see): the same
            // bytes are a success, other bytes an error, never an overwrite.
            let manifest = Manifest::open(&bytes, &id, keys)?;
            let (sha, len) = input.digest()?;
            if sha == manifest.plaintext_sha256 && len == manifest.plaintext_bytes {
                return Ok(WalPushed::AlreadyArchived(manifest));
            }
            return Err(Error::TargetNotEmpty {
                target: format!("{} in {}", id, store.describe()),
                reason: format!(
                    "{name} is archived already with other content ({} bytes, SHA-256 {}; \
                     this file: {len} bytes, {sha}); an archive is never overwritten",
                    manifest.plaintext_bytes, manifest.plaintext_sha256
                ),
            });
        }
        Err(Error::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    let len = input.len()?;
    let system_identifier = match parsed {
        WalName::Segment { .. } | WalName::Partial { .. } | WalName::Streamed { .. } => {
            Some(check_segment(input, name, &parsed, len)?)
        }
        _ => None,
    };
    let manifest = write_object(
        store,
        keys.writer(),
        compress,
        None,
        &id,
        BackupKind::Wal,
        WAL_SOURCE.into(),
        Vec::new(),
        |writer| {
            let copied = match input {
                WalInput::File(path) => {
                    let mut file = fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
                    copy_large(&mut file, writer).map_err(|e| match from_io(e, String::new) {
                        Error::Stream { source, .. } => Error::io("read", path, source),
                        other => other,
                    })?
                }
                WalInput::Bytes(bytes) => {
                    writer
                        .write_all(bytes)
                        .map_err(|e| from_io(e, || format!("archive {name}")))?;
                    bytes.len() as u64
                }
            };
            if copied != len {
                return Err(Error::io(
                    "read",
                    Path::new(&input.describe(name)),
                    io::Error::other(format!("{len} bytes at open, {copied} read")),
                ));
            }
            Ok(Details::Wal {
                name: name.to_owned(),
                system_identifier,
            })
        },
    )?;
    Ok(WalPushed::Stored(manifest))
}

/// An exclusive lock on `<store>/.wal-push.lock`, released on drop (or process death).
fn lock_pushes(root: &Path) -> Result<nix::fcntl::Flock<fs::File>> {
    let path = root.join(".wal-push.lock");
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| Error::io("lock", &path, io::Error::from(errno)))
}

/// Fetches archived file `name` to `dest` (blocking): verified completely into a temporary
/// file beside `dest` (fsynced if `options.fsync`), renamed.
fn fetch_blocking(
    store: &dyn BackupStore,
    keys: &KeyRing,
    name: &str,
    dest: &Path,
    options: WalFetchOptions,
) -> Result<Manifest> {
    let parsed = WalName::parse(name).ok_or_else(|| bad_name(name))?;
    let id = wal_id(name)?;
    match fetch_object(store, keys, name, dest, options.fsync) {
        Err(Error::NotFound { .. })
            if options.partial && matches!(parsed, WalName::Segment { .. }) =>
        {
            match newest_streamed(store, &parsed)? {
                Some(streamed) => {
                    tracing::info!(
                        segment = name,
                        streamed = %streamed,
                        "segment not archived: handing over the newest streamed partial"
                    );
                    fetch_object(store, keys, &streamed, dest, options.fsync)
                }
                None => Err(Error::NotFound {
                    backup_id: format!("{id} (nor a streamed partial of it)"),
                }),
            }
        }
        other => other,
    }
}

/// The streamed partial of segment `segment` that holds the most bytes, if any.
fn newest_streamed(store: &dyn BackupStore, segment: &WalName) -> Result<Option<String>> {
    let WalName::Segment { timeline, log, seg } = *segment else {
        return Ok(None);
    };
    let mut best: Option<(u32, String)> = None;
    for id in store.list()? {
        let Some(name) = id.as_str().strip_prefix(WAL_PREFIX) else {
            continue;
        };
        if let Some(WalName::Streamed {
            timeline: t,
            log: l,
            seg: s,
            end,
        }) = WalName::parse(name)
            && (t, l, s) == (timeline, log, seg)
            && best.as_ref().is_none_or(|(e, _)| end > *e)
        {
            best = Some((end, name.to_owned()));
        }
    }
    Ok(best.map(|(_, name)| name))
}

/// Fetches the archived object of WAL file `name` to `dest`, verified completely first:
/// decoded on a second thread while this one writes, fsynced if `fsync`.
fn fetch_object(
    store: &dyn BackupStore,
    keys: &KeyRing,
    name: &str,
    dest: &Path,
    fsync: bool,
) -> Result<Manifest> {
    let id = wal_id(name)?;
    let mut reader = BackupReader::open(store, keys, &id)?;
    let manifest = reader.manifest().clone();
    match &manifest.details {
        Details::Wal { name: stored, .. } if stored == name && manifest.kind == BackupKind::Wal => {
        }
        _ => {
            return Err(Error::corrupt(
                id.as_str(),
                format!("the manifest does not describe WAL file {name}"),
            ));
        }
    }
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let suffix: [u8; 6] = random_array()?;
    let base = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "wal".into());
    let temp = dir.join(format!(".ha-dr-fetch-{base}-{}", hex::encode(suffix)));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| Error::io("create", &temp, e))?;
        read_ahead(&mut reader, |plain| {
            copy_large(plain, &mut file).map_err(|e| match from_io(e, String::new) {
                Error::Stream { source, .. } => Error::io("write", &temp, source),
                other => other,
            })
        })?;
        if fsync {
            file.sync_all().map_err(|e| Error::io("fsync", &temp, e))?;
        }
        fs::rename(&temp, dest).map_err(|e| Error::io("rename into place", dest, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map(|()| manifest)
}

/// The archived WAL in a store, indexed (manifests authenticated).
struct WalIndex {
    segment_size: u64,
    /// `(timeline, segno)` → the segment's manifest.
    segments: BTreeMap<(u32, u64), Manifest>,
    /// timeline → its history file's manifest.
    histories: BTreeMap<u32, Manifest>,
}

impl WalIndex {
    fn load(store: &dyn BackupStore, keys: &KeyRing) -> Result<Self> {
        let mut found = Vec::new();
        for id in store.list()? {
            let Some(name) = id.as_str().strip_prefix(WAL_PREFIX) else {
                continue;
            };
            let Some(parsed) = WalName::parse(name) else {
                continue;
            };
            // A manifest that does not authenticate is not archived WAL: it counts as missing.
            match store
                .get_manifest(&id)
                .and_then(|bytes| Manifest::open(&bytes, &id, keys))
            {
                Ok(m) if m.kind == BackupKind::Wal => found.push((parsed, m)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(backup_id = %id, error = %e, "archived WAL file not accepted")
                }
            }
        }
        let segment_size = segment_size(&found)?;
        let mut index = WalIndex {
            segment_size,
            segments: BTreeMap::new(),
            histories: BTreeMap::new(),
        };
        for (parsed, m) in found {
            match parsed {
                WalName::Segment { .. } => {
                    if let Some(key) = parsed.segno(segment_size) {
                        index.segments.insert(key, m);
                    }
                }
                WalName::History { timeline } => {
                    index.histories.insert(timeline, m);
                }
                _ => {}
            }
        }
        Ok(index)
    }

    fn newest_timeline(&self) -> u32 {
        let from_segments = self.segments.keys().map(|(t, _)| *t).max().unwrap_or(1);
        let from_histories = self.histories.keys().copied().max().unwrap_or(1);
        from_segments.max(from_histories)
    }
}

/// The WAL segment size of a store: that of its archived segments (all must agree), the
/// default where none is archived.
fn segment_size(found: &[(WalName, Manifest)]) -> Result<u64> {
    let sizes: BTreeSet<u64> = found
        .iter()
        .filter(|(n, _)| matches!(n, WalName::Segment { .. }))
        .map(|(_, m)| m.plaintext_bytes)
        .collect();
    match sizes.len() {
        0 => Ok(DEFAULT_WAL_SEGMENT_SIZE),
        1 => Ok(sizes.into_iter().next().unwrap_or(DEFAULT_WAL_SEGMENT_SIZE)),
        _ => Err(Error::Unsupported(format!(
            "archived WAL segments of several sizes ({sizes:?} bytes) in one store"
        ))),
    }
}

/// A stretch of the timeline path: `timeline` from segment `begin` (inclusive) to `end`
/// (inclusive; `None`: open).
#[derive(Clone, Copy, Debug)]
struct Stretch {
    timeline: u32,
    begin: u64,
    end: Option<u64>,
}

/// The plaintext of a small archived file, verified.
fn read_small(store: &dyn BackupStore, keys: &KeyRing, id: &BackupId) -> Result<String> {
    let mut reader = BackupReader::open(store, keys, id)?;
    let mut text = String::new();
    reader
        .read_to_string(&mut text)
        .map_err(|e| from_io(e, || format!("read {id}")))?;
    Ok(text)
}

/// How far a restore needs the chain.
#[derive(Clone, Copy, Debug)]
enum Need {
    /// To the newest archived segment.
    Newest,
    /// To the segment holding this LSN.
    Lsn(Lsn),
    /// To the first segment archived at or after this time (or the newest).
    Time(SystemTime),
}

/// Checks the chain of base backup `base` (blocking). `deep`: also read every segment.
fn check_chain(
    store: &dyn BackupStore,
    keys: &KeyRing,
    index: &WalIndex,
    base: &Manifest,
    need: Need,
    deep: &mut dyn FnMut(&BackupId) -> Result<()>,
) -> Result<ChainReport> {
    let Details::PgBase {
        start_lsn,
        stop_lsn,
        timeline,
        system_identifier,
        ..
    } = &base.details
    else {
        return Err(Error::Unsupported(format!(
            "backup {} is a {} backup, not a base backup",
            base.id, base.kind
        )));
    };
    let broken = |missing: Option<String>, detail: String| Error::WalChain {
        backup_id: base.id.to_string(),
        missing,
        detail,
    };
    let size = index.segment_size;
    let start: Lsn = start_lsn.parse()?;
    let stop: Lsn = stop_lsn.parse()?;
    let newest = index.newest_timeline().max(*timeline);
    // The path of timelines that leads to the newest one, from its history file.
    let mut path = Vec::new();
    if newest > 1 {
        let Some(history) = index.histories.get(&newest) else {
            let name = format!("{newest:08X}.history");
            return Err(broken(
                Some(name.clone()),
                format!("the history file {name} of the newest timeline {newest} is missing"),
            ));
        };
        let text = read_small(store, keys, &history.id)?;
        let entries = parse_history(&text).ok_or_else(|| {
            Error::corrupt(history.id.as_str(), "the timeline history does not parse")
        })?;
        let mut begin = 0;
        for (parent, switch) in entries {
            let end_seg = switch.0.saturating_sub(1) / size;
            path.push(Stretch {
                timeline: parent,
                begin,
                end: Some(end_seg.max(begin)),
            });
            begin = switch.0 / size;
        }
        path.push(Stretch {
            timeline: newest,
            begin,
            end: None,
        });
    } else {
        path.push(Stretch {
            timeline: 1,
            begin: 0,
            end: None,
        });
    }
    let start_seg = start.0 / size;
    let stop_seg = stop.0.saturating_sub(1) / size;
    let on_path = path
        .iter()
        .any(|s| s.timeline == *timeline && s.end.is_none_or(|end| start_seg <= end));
    if !on_path {
        return Err(broken(
            None,
            format!(
                "its timeline {timeline} does not lead to the newest timeline {newest} (path: {})",
                path.iter()
                    .map(|s| s.timeline.to_string())
                    .collect::<Vec<_>>()
                    .join(" -> ")
            ),
        ));
    }
    // Which timeline PostgreSQL reads segment `n` from: the newest stretch beginning at or
    // before it (the segment of a switch comes from the new timeline).
    let timeline_of = |n: u64| {
        path.iter()
            .rev()
            .find(|s| s.begin <= n)
            .map_or(1, |s| s.timeline)
    };
    // The newest segment PostgreSQL would read on this path: a segment of an older timeline
    // past the point where a newer one branched off (the old primary kept writing, or a
    // restore branched off a branch) is not on the path.
    let newest_seg = path
        .iter()
        .filter_map(|s| {
            index
                .segments
                .range((s.timeline, s.begin)..=(s.timeline, s.end.unwrap_or(u64::MAX)))
                .rev()
                .map(|((_, n), _)| *n)
                .find(|n| timeline_of(*n) == s.timeline)
        })
        .max()
        .unwrap_or(start_seg);
    let end = match need {
        Need::Newest => newest_seg,
        Need::Lsn(lsn) => lsn.0 / size,
        Need::Time(t) => {
            let reaching = (stop_seg..=newest_seg).find(|n| {
                index
                    .segments
                    .get(&(timeline_of(*n), *n))
                    .is_some_and(|m| m.created >= t)
            });
            match (
                reaching,
                index.segments.get(&(timeline_of(newest_seg), newest_seg)),
            ) {
                (Some(n), _) => n,
                // Every archived record is older than T: recovery could never find the
                // first commit after it and would fail once the WAL ran out.
                (None, Some(newest)) => {
                    return Err(broken(
                        None,
                        format!(
                            "no archived WAL reaches the target time {}: the newest segment, \
                             {}, was archived at {}; switch WAL on the server \
                             (SELECT pg_switch_wal()) and let it be archived, or restore \
                             --latest",
                            humantime::format_rfc3339_micros(t),
                            segment_name(timeline_of(newest_seg), newest_seg, size),
                            humantime::format_rfc3339_micros(newest.created)
                        ),
                    ));
                }
                (None, None) => newest_seg,
            }
        }
    }
    .max(stop_seg);
    let mut timelines = Vec::new();
    for n in start_seg..=end {
        let tli = timeline_of(n);
        let name = segment_name(tli, n, size);
        let Some(segment) = index.segments.get(&(tli, n)) else {
            let why = if n > newest_seg {
                format!(
                    "segment {name} is not archived (the newest archived segment on the path is \
                     {})",
                    segment_name(timeline_of(newest_seg), newest_seg, size)
                )
            } else {
                format!("segment {name} is missing from the archive")
            };
            return Err(broken(Some(name), why));
        };
        if let Details::Wal {
            system_identifier: Some(sysid),
            ..
        } = &segment.details
            && sysid != system_identifier
        {
            return Err(broken(
                Some(name.clone()),
                format!(
                    "segment {name} belongs to cluster {sysid}, the base backup to {system_identifier}"
                ),
            ));
        }
        deep(&segment.id)?;
        if timelines.last() != Some(&tli) {
            timelines.push(tli);
        }
    }
    Ok(ChainReport {
        base: base.id.clone(),
        first: segment_name(timeline_of(start_seg), start_seg, size),
        last: segment_name(timeline_of(end), end, size),
        segments: end - start_seg + 1,
        timelines,
    })
}

/// The archived WAL files no base backup in `kept` needs: segments, `.partial` segments
/// and backup history files before the oldest start segment of `kept` (on any timeline).
/// Timeline history files are always kept (they are tiny, and every later timeline switch
/// reads them). Nothing when `kept` is empty: without a base backup nothing says which WAL
/// will be needed. `authenticated`: the store's manifests, authenticated (WAL among them).
pub(crate) fn wal_not_needed(
    kept: &[Manifest],
    authenticated: &[Manifest],
) -> Result<Vec<BackupId>> {
    let found: Vec<(WalName, Manifest)> = authenticated
        .iter()
        .filter(|m| m.kind == BackupKind::Wal)
        .filter_map(|m| {
            let name = m.id.as_str().strip_prefix(WAL_PREFIX)?;
            Some((WalName::parse(name)?, m.clone()))
        })
        .collect();
    let size = segment_size(&found)?;
    let oldest = kept
        .iter()
        .filter_map(|m| match &m.details {
            Details::PgBase { start_lsn, .. } => start_lsn.parse::<Lsn>().ok(),
            _ => None,
        })
        .map(|lsn| lsn.0 / size)
        .min();
    let Some(oldest) = oldest else {
        return Ok(Vec::new());
    };
    Ok(found
        .into_iter()
        .filter(|(parsed, _)| parsed.segno(size).is_some_and(|(_, segno)| segno < oldest))
        .map(|(_, m)| m.id)
        .collect())
}

/// Reads a whole object, so every segment and the SHA-256 are checked.
fn verify_object(store: &dyn BackupStore, keys: &KeyRing, id: &BackupId) -> Result<()> {
    let mut reader = BackupReader::open(store, keys, id)?;
    reader.drain()
}

impl Repository {
    /// Archives the WAL file at `path` (PostgreSQL's `%p`): a segment, `.partial`
    /// segment, timeline history or backup history file, under id `wal-<name>`. Returns once
    /// data and manifest are durable. Pushing the same file again succeeds without writing;
    /// a file of the same name with other content is refused, never overwritten. A segment
    /// whose first page header does not match its name and size is refused.
    pub async fn wal_push(&self, path: &Path) -> Result<WalPushed> {
        let (store, keys, compress) = (Arc::clone(&self.store), self.keys.clone(), self.compress);
        let path = path.to_path_buf();
        let result = Self::blocking(move || push_blocking(&*store, &keys, compress, &path)).await;
        let outcome = match &result {
            Ok(WalPushed::Stored(m)) => {
                tracing::info!(backup_id = %m.id, bytes = m.stored_bytes, "WAL file archived");
                "success"
            }
            Ok(WalPushed::AlreadyArchived(m)) => {
                tracing::info!(backup_id = %m.id, "WAL file archived before with the same content");
                "success"
            }
            Err(e) => {
                tracing::warn!(error = %e, "WAL push failed");
                "failure"
            }
        };
        metrics::counter!(ha_core::metric::BACKUPS_TOTAL, "kind" => BackupKind::Wal.as_str(), "outcome" => outcome).increment(1);
        result
    }

    /// Fetches archived WAL file `name` (PostgreSQL's `%f`) to `dest` (`%p`). Nothing
    /// appears at `dest` unless every byte authenticated and the manifest's size and SHA-256
    /// match: it is written to a temporary file beside `dest` and renamed. Not fsynced (see
    /// [`WalFetchOptions::fsync`]). [`Error::NotFound`] when the archive has no such file.
    pub async fn wal_fetch(&self, name: &str, dest: &Path) -> Result<Manifest> {
        self.wal_fetch_with(name, dest, WalFetchOptions::default())
            .await
    }

    /// [`wal_fetch`](Self::wal_fetch) with [`WalFetchOptions`].
    pub async fn wal_fetch_with(
        &self,
        name: &str,
        dest: &Path,
        options: WalFetchOptions,
    ) -> Result<Manifest> {
        let (store, keys) = (Arc::clone(&self.store), self.keys.clone());
        let (name, dest) = (name.to_owned(), dest.to_path_buf());
        Self::blocking(move || fetch_blocking(&*store, &keys, &name, &dest, options)).await
    }

    /// Archives `bytes`, a snapshot of the segment `wal-stream` is receiving, as the
    /// streamed partial `name` ([`WalName::Streamed`]), on the same rules as
    /// [`wal_push`](Self::wal_push).
    pub(crate) async fn wal_push_bytes(&self, name: String, bytes: Vec<u8>) -> Result<WalPushed> {
        let (store, keys, compress) = (Arc::clone(&self.store), self.keys.clone(), self.compress);
        Self::blocking(move || {
            push_input(&*store, &keys, compress, &name, &WalInput::Bytes(&bytes))
        })
        .await
    }

    /// Takes a base backup of the whole cluster at `url` with `pg_basebackup` (tar format to
    /// stdout, no WAL: the WAL comes from the archive, which must be set up with
    /// [`wal_push`](Self::wal_push)). `pg_basebackup` waits until the WAL the backup needs is
    /// archived. The manifest records the backup label, the start and stop WAL positions,
    /// the timeline and the system identifier. The same as [`backup`](Self::backup) of
    /// [`Source::pg_base`](crate::Source::pg_base) (events, metrics), which is how the
    /// scheduler takes them.
    pub async fn backup_pg_base(
        &self,
        url: &str,
        tools: &PgTools,
        tags: &[String],
    ) -> Result<Manifest> {
        self.backup(&crate::Source::pg_base(url, tools.clone()), tags)
            .await
    }

    /// The newest archived WAL segment (or `.partial`) and when it was archived: of the
    /// highest segment of each timeline, the one archived last (so an abandoned timeline
    /// does not hide a primary that stopped archiving, nor the reverse). Manifests
    /// authenticated; `None` when nothing is archived.
    pub async fn newest_wal(&self) -> Result<Option<(String, SystemTime)>> {
        let (store, keys) = (Arc::clone(&self.store), self.keys.clone());
        Self::blocking(move || {
            let mut top: BTreeMap<u32, ((u32, u32), BackupId)> = BTreeMap::new();
            for id in store.list()? {
                let parsed = id
                    .as_str()
                    .strip_prefix(WAL_PREFIX)
                    .and_then(WalName::parse);
                let (WalName::Segment { timeline, log, seg }
                | WalName::Partial { timeline, log, seg }
                | WalName::Streamed {
                    timeline, log, seg, ..
                }) = (match parsed {
                    Some(p) => p,
                    None => continue,
                })
                else {
                    continue;
                };
                let entry = top.entry(timeline).or_insert(((log, seg), id.clone()));
                if (log, seg) > entry.0 {
                    *entry = ((log, seg), id);
                }
            }
            let mut newest: Option<(String, SystemTime)> = None;
            for (_, id) in top.into_values() {
                let manifest = Manifest::open(&store.get_manifest(&id)?, &id, &keys)?;
                let name = id.as_str().trim_start_matches(WAL_PREFIX).to_owned();
                if newest.as_ref().is_none_or(|(_, at)| manifest.created > *at) {
                    newest = Some((name, manifest.created));
                }
            }
            Ok(newest)
        })
        .await
    }

    /// Proves, for every base backup in the store, that the archived WAL from its start to
    /// the newest segment of the newest timeline is complete: every segment present,
    /// authenticated and read through, on the timeline PostgreSQL would read it from, and of
    /// the same cluster. Each result names the first missing segment when there is one.
    pub async fn verify_chain(&self) -> Result<Vec<(BackupId, Result<ChainReport>)>> {
        let (store, keys) = (Arc::clone(&self.store), self.keys.clone());
        let (bases, _) = self.list_authenticated().await?;
        Self::blocking(move || {
            let index = WalIndex::load(&*store, &keys)?;
            let mut verified = BTreeSet::new();
            let mut out = Vec::new();
            for base in bases.iter().filter(|m| m.kind == BackupKind::PgBase) {
                let mut deep = |id: &BackupId| {
                    if verified.contains(id) {
                        return Ok(());
                    }
                    verify_object(&*store, &keys, id)?;
                    verified.insert(id.clone());
                    Ok(())
                };
                let report = check_chain(&*store, &keys, &index, base, Need::Newest, &mut deep);
                out.push((base.id.clone(), report));
            }
            Ok(out)
        })
        .await
    }

    /// Restores base backup `id` into the new data directory `target` (absent or empty),
    /// set up to recover with archived WAL: `recovery.signal`, and in
    /// `postgresql.auto.conf` the `restore_command`, `recovery_target_timeline = 'latest'`
    /// and the target with `recovery_target_action = 'promote'`.
    ///
    /// First checks that the archive holds every segment the target needs (from the backup's
    /// start to the target, or to the newest segment for [`RecoveryTarget::Latest`] and
    /// [`RecoveryTarget::Xid`]) and fails naming the first missing one: PostgreSQL would
    /// otherwise end recovery at a gap and promote, silently without the rest. The tree is
    /// staged in a private sibling directory, fsynced, and renamed into place only when
    /// complete, so a failed restore leaves nothing that could be started.
    pub async fn restore_pg_base(
        &self,
        id: &BackupId,
        target: &Path,
        recovery: &PitrRestore,
    ) -> Result<Checked> {
        let clock = Instant::now();
        let manifest = self.manifest(id).await?;
        let Details::PgBase { .. } = manifest.details else {
            return Err(Error::Unsupported(format!(
                "backup {id} is a {} backup; only pg_base backups restore to a point in time",
                manifest.kind
            )));
        };
        if let RecoveryTarget::Time(t) = recovery.target {
            let ended = manifest.created + manifest.duration;
            if t < ended {
                return Err(ha_core::ConfigError::new(
                    "target-time",
                    format!(
                        "{} is before base backup {id} ended ({}): restore an older base backup",
                        humantime::format_rfc3339_micros(t),
                        humantime::format_rfc3339_seconds(ended)
                    ),
                )
                .into());
            }
        }
        let need = match recovery.target {
            RecoveryTarget::Latest | RecoveryTarget::Xid(_) => Need::Newest,
            RecoveryTarget::Lsn(lsn) => Need::Lsn(lsn),
            RecoveryTarget::Time(t) => Need::Time(t),
        };
        let (store, keys, progress) = (
            Arc::clone(&self.store),
            self.keys.clone(),
            self.progress.clone(),
        );
        let (base, target_dir) = (manifest.clone(), target.to_path_buf());
        let mut conf = String::from("\n# ha-dr restore (point-in-time recovery)\n");
        let mut settings = vec![
            ("restore_command", recovery.restore_command.clone()),
            ("recovery_target_timeline", "latest".to_owned()),
        ];
        settings.extend(recovery.target.settings());
        for (key, value) in settings {
            conf.push_str(&format!("{key} = '{}'\n", value.replace('\'', "''")));
        }
        let report = Self::blocking(move || {
            let index = WalIndex::load(&*store, &keys)?;
            let report = check_chain(&*store, &keys, &index, &base, need, &mut |_| Ok(()))?;
            restore_tree(&*store, &keys, progress, &base.id, &target_dir, &conf)?;
            Ok(report)
        })
        .await?;
        let duration = clock.elapsed();
        self.restored(&manifest, duration, true);
        Ok(Checked {
            manifest,
            duration,
            detail: format!(
                "data directory written; archived WAL {} to {} ({} segments, timelines {:?}) \
                 checked present",
                report.first, report.last, report.segments, report.timelines
            ),
        })
    }
}

/// `pg_basebackup` into the store (events and metrics are the caller's).
pub(crate) async fn base_backup(
    repo: &Repository,
    url: &str,
    tools: &PgTools,
    tags: &[String],
) -> Result<Manifest> {
    let id = BackupId::generate(BackupKind::PgBase.as_str(), SystemTime::now())?;
    let (store, key) = (Arc::clone(&repo.store), repo.keys.writer().clone());
    let (compress, progress) = (repo.compress, repo.progress.clone());
    let (tools, url, tags) = (tools.clone(), url.to_owned(), tags.to_vec());
    Repository::blocking(move || {
        let mut command = tools.connecting("pg_basebackup", &url);
        command
            .args(["-D", "-", "-F", "t", "-X", "none", "-c", "fast", "-l"])
            .arg(format!("ha-dr {id}"))
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        if std::env::var_os("PGCONNECT_TIMEOUT").is_none() {
            command.env("PGCONNECT_TIMEOUT", "10");
        }
        let described = crate::pg::redact(&url);
        write_object(
            &*store,
            &key,
            compress,
            progress,
            &id,
            BackupKind::PgBase,
            described,
            tags,
            |writer| {
                let mut child = ChildGuard::spawn(command, "pg_basebackup")?;
                let stdout = child.child_mut().and_then(|c| c.stdout.take());
                let Some(stdout) = stdout else {
                    return Err(Error::Task("pg_basebackup has no stdout".into()));
                };
                let scanned = scan_base_tar(
                    id.as_str(),
                    &mut Tee {
                        // Large reads from the pipe; tar's 512-byte header reads come
                        // from the buffer.
                        inner: io::BufReader::with_capacity(1 << 20, stdout),
                        out: writer,
                    },
                );
                // The child's own failure explains a broken stream best.
                child.wait()?;
                let facts = scanned?;
                let missing = |what: &str| Error::Command {
                    program: "pg_basebackup".into(),
                    detail: format!("its tar stream holds no {what}"),
                };
                let label = facts.label.ok_or_else(|| missing("backup_label"))?;
                let (start, timeline) =
                    parse_label(&label).ok_or_else(|| missing("readable backup_label"))?;
                let stop = facts
                    .manifest
                    .as_deref()
                    .and_then(parse_stop)
                    .ok_or_else(|| missing("backup_manifest with WAL-Ranges"))?;
                let system_identifier = facts
                    .system_identifier
                    .ok_or_else(|| missing("global/pg_control"))?;
                Ok(Details::PgBase {
                    entries: facts.entries,
                    start_lsn: start.to_string(),
                    stop_lsn: stop.to_string(),
                    timeline,
                    system_identifier,
                    label,
                })
            },
        )
    })
    .await
}

/// Extracts base backup `id` beside `target`, adds the recovery settings, fsyncs and renames
/// it into place.
fn restore_tree(
    store: &dyn BackupStore,
    keys: &KeyRing,
    progress: Option<Progress>,
    id: &BackupId,
    target: &Path,
    conf: &str,
) -> Result<()> {
    check_target(target, true, false)?;
    let placement = staging::placement(target, true)?;
    let staging = Staging::create(target, true, placement, SystemTime::now())?;
    let staged = staging.path().to_path_buf();
    let mut reader = BackupReader::open(store, keys, id)?.with_progress(progress);
    extract_tree(&mut reader, &staged)?;
    let signal = staged.join("recovery.signal");
    fs::File::create(&signal).map_err(|e| Error::io("create", &signal, e))?;
    let auto = staged.join("postgresql.auto.conf");
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&auto)
        .and_then(|mut f| f.write_all(conf.as_bytes()))
        .map_err(|e| Error::io("write", &auto, e))?;
    // PostgreSQL refuses a data directory others may enter.
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("set mode of", &staged, e))?;
    sync_tree(&staged)?;
    staging.commit(false)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::key::MasterKey;

    const MIB16: u64 = 16 << 20;

    /// An index of timeline-1 segments `present` (16 MiB) with no history files.
    fn index_of(present: &BTreeSet<u64>) -> WalIndex {
        let key = MasterKey::from_bytes([9; 32]);
        let mut segments = BTreeMap::new();
        for &n in present {
            let name = segment_name(1, n, MIB16);
            let mut m = crate::manifest::tests::sample(&format!("wal-{name}"), &key);
            m.kind = BackupKind::Wal;
            m.plaintext_bytes = MIB16;
            m.details = Details::Wal {
                name,
                system_identifier: Some(42),
            };
            segments.insert((1, n), m);
        }
        WalIndex {
            segment_size: MIB16,
            segments,
            histories: BTreeMap::new(),
        }
    }

    fn base(start_seg: u64, stop_seg: u64) -> Manifest {
        let key = MasterKey::from_bytes([9; 32]);
        let mut m = crate::manifest::tests::sample("pg_base-x", &key);
        m.kind = BackupKind::PgBase;
        m.details = Details::PgBase {
            entries: 1,
            start_lsn: Lsn(start_seg * MIB16 + 0x28).to_string(),
            stop_lsn: Lsn(stop_seg * MIB16 + 0x100).to_string(),
            timeline: 1,
            system_identifier: 42,
            label: String::new(),
        };
        m
    }

    /// Timeline 2 branched off 1 in segment 9; timeline 3 branched off the 1-then-2 path at
    /// an earlier point, in segment 6 (a restore to a time before the first branch): the
    /// path to 3 reads 1 up to segment 5 and 3 from 6 on, and neither 1's segments past 5
    /// nor 2's are on it.
    #[test]
    fn the_chain_follows_a_branch_of_a_branch() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::LocalStore::open(dir.path().join("store")).unwrap();
        let key = MasterKey::from_bytes([9; 32]);
        let keys = KeyRing::new(key.clone());
        let history = write_object(
            &store,
            &key,
            Compress {
                level: 0,
                workers: 0,
            },
            None,
            &wal_id("00000003.history").unwrap(),
            BackupKind::Wal,
            WAL_SOURCE.into(),
            Vec::new(),
            |w| {
                let text = format!(
                    "1\t{}\tone\n2\t{}\ttwo\n",
                    Lsn(9 * MIB16 + 0x80),
                    Lsn(6 * MIB16 + 0x80)
                );
                w.write_all(text.as_bytes()).unwrap();
                Ok(Details::Wal {
                    name: "00000003.history".into(),
                    system_identifier: None,
                })
            },
        )
        .unwrap();
        let mut index = index_of(&(0..=9).collect());
        let on = |timeline: u32, n: u64| {
            let name = segment_name(timeline, n, MIB16);
            let mut m = crate::manifest::tests::sample(&format!("wal-{name}"), &key);
            m.kind = BackupKind::Wal;
            m.details = Details::Wal {
                name,
                system_identifier: Some(42),
            };
            ((timeline, n), m)
        };
        index
            .segments
            .extend([on(2, 9), on(2, 10), on(3, 6), on(3, 7)]);
        index.histories.insert(3, history);
        let check = |index: &WalIndex| {
            check_chain(&store, &keys, index, &base(1, 1), Need::Newest, &mut |_| {
                Ok(())
            })
        };
        let report = check(&index).unwrap();
        assert_eq!(report.timelines, vec![1, 3]);
        assert_eq!(report.last, "000000030000000000000007");
        assert_eq!(report.segments, 7);
        index.segments.remove(&(3, 6));
        match check(&index) {
            Err(Error::WalChain { missing, .. }) => {
                assert_eq!(missing.as_deref(), Some("000000030000000000000006"));
            }
            other => panic!("{:?}", other.map(|r| r.last)),
        }
    }

    #[test]
    fn a_target_time_past_every_archived_segment_is_refused() {
        let present: BTreeSet<u64> = (3..=6).collect();
        let index = index_of(&present);
        let dir = tempfile::tempdir().unwrap();
        let store = crate::LocalStore::open(dir.path().join("store")).unwrap();
        let keys = KeyRing::new(MasterKey::from_bytes([9; 32]));
        // The sample manifests were all archived at the same instant.
        let archived = index.segments[&(1, 6)].created;
        let check = |t| {
            check_chain(
                &store,
                &keys,
                &index,
                &base(3, 3),
                Need::Time(t),
                &mut |_| Ok(()),
            )
        };
        let report = check(archived).unwrap();
        assert_eq!(
            report.last,
            segment_name(1, 3, MIB16),
            "the first archived at or after T"
        );
        let err = check(archived + std::time::Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("no archived WAL reaches"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever segments are present, the chain from a base backup is complete exactly
        /// when no segment from its start to the newest is missing, and a broken chain names
        /// the first missing segment.
        #[test]
        fn the_chain_names_the_first_missing_segment(
            start in 0u64..40,
            stop_after in 0u64..3,
            present in proptest::collection::btree_set(0u64..60, 0..60),
        ) {
            let stop = start + stop_after;
            let index = index_of(&present);
            // One timeline: the store is never read (only history files are).
            let dir = tempfile::tempdir().unwrap();
            let store = crate::LocalStore::open(dir.path().join("store")).unwrap();
            let keys = KeyRing::new(MasterKey::from_bytes([9; 32]));
            let result = check_chain(&store, &keys, &index, &base(start, stop), Need::Newest, &mut |_| Ok(()));
            let newest = present.iter().copied().max().unwrap_or(start).max(stop);
            let first_missing = (start..=newest).find(|n| !present.contains(n));
            match (result, first_missing) {
                (Ok(report), None) => {
                    prop_assert_eq!(report.segments, newest - start + 1);
                    prop_assert_eq!(report.first, segment_name(1, start, MIB16));
                    prop_assert_eq!(report.last, segment_name(1, newest, MIB16));
                }
                (Err(Error::WalChain { missing, .. }), Some(n)) => {
                    prop_assert_eq!(missing, Some(segment_name(1, n, MIB16)));
                }
                (other, want) => prop_assert!(false, "{:?} but first missing {:?}", other.map(|r| r.last), want),
            }
        }

        #[test]
        fn lsns_round_trip(value in any::<u64>()) {
            prop_assert_eq!(Lsn(value).to_string().parse::<Lsn>().unwrap(), Lsn(value));
        }

        #[test]
        fn segment_names_round_trip(
            timeline in 1u32..,
            shift in 20u32..=30,
            segno in any::<u64>(),
        ) {
            let size = 1u64 << shift;
            // Segment numbers are bounded by the 64-bit WAL address space.
            let segno = segno % (u64::MAX / size);
            let name = segment_name(timeline, segno, size);
            let parsed = WalName::parse(&name).unwrap();
            prop_assert_eq!(parsed.segno(size), Some((timeline, segno)));
        }

        /// The parser never panics, and what it accepts is named exactly one way.
        #[test]
        fn wal_names_parse_totally(name in "[0-9A-Fa-f.a-z]{0,40}") {
            if let Some(WalName::Segment { timeline, log, seg }) = WalName::parse(&name) {
                prop_assert_eq!(format!("{timeline:08X}{log:08X}{seg:08X}"), name);
            }
        }
    }

    #[test]
    fn wal_names_parse() {
        assert_eq!(
            WalName::parse("000000010000000000000003"),
            Some(WalName::Segment {
                timeline: 1,
                log: 0,
                seg: 3
            })
        );
        assert_eq!(
            WalName::parse("00000002.history"),
            Some(WalName::History { timeline: 2 })
        );
        assert_eq!(
            WalName::parse("000000010000000000000002.00000028.backup"),
            Some(WalName::BackupHistory {
                timeline: 1,
                log: 0,
                seg: 2
            })
        );
        assert_eq!(
            WalName::parse("000000010000000000000003.stream.00A1B2C8"),
            Some(WalName::Streamed {
                timeline: 1,
                log: 0,
                seg: 3,
                end: 0x00A1_B2C8
            })
        );
        assert_eq!(
            WalName::parse("000000010000000000000003.stream.a1b2c3d4"),
            None
        );
        assert!(matches!(
            WalName::parse("000000020000000100000005.partial"),
            Some(WalName::Partial { timeline: 2, .. })
        ));
        for bad in [
            "",
            "RECOVERYXLOG",
            "00000001000000000000000",
            "0000000100000000000000003",
            "000000010000000000000003.tmp",
            "00000001000000000000000a",
            "../00000002.history",
            "0000000G.history",
        ] {
            assert_eq!(WalName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn segment_numbers_round_trip_through_names() {
        let size = 16 << 20;
        for segno in [0u64, 1, 0xFF, 0x100, 0x1234_5678] {
            let name = segment_name(7, segno, size);
            let parsed = WalName::parse(&name).unwrap();
            assert_eq!(parsed.segno(size), Some((7, segno)), "{name}");
        }
        assert_eq!(segment_name(1, 0x100, size), "000000010000000100000000");
        // A low part past the segments of one log id is not a segment of that size.
        let parsed = WalName::parse("000000010000000000000100").unwrap();
        assert_eq!(parsed.segno(size), None);
    }

    #[test]
    fn label_manifest_and_history_parse() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\n\
                     START TIMELINE: 3\n";
        assert_eq!(parse_label(label), Some((Lsn(0x200_0028), 3)));
        let manifest = br#"{"WAL-Ranges": [{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }]}"#;
        assert_eq!(parse_stop(manifest), Some(Lsn(0x200_0100)));
        let history = "1\t0/5000198\tno recovery target specified\n\n2\t1/A0\tbefore 2026\n";
        assert_eq!(
            parse_history(history),
            Some(vec![(1, Lsn(0x500_0198)), (2, Lsn(0x1_0000_00A0))])
        );
    }

    #[test]
    fn restore_command_quotes_paths() {
        let command = wal_fetch_command(
            Path::new("/opt/ha dr/ha-dr"),
            Path::new("/srv/it's 100%"),
            &[("key-file", Path::new("/k"))],
            false,
        );
        assert_eq!(
            command,
            "'/opt/ha dr/ha-dr' wal-fetch --store '/srv/it'\\''s 100%%' --key-file '/k' %f %p"
        );
        let latest = wal_fetch_command(Path::new("/x"), Path::new("/s"), &[], true);
        assert_eq!(latest, "'/x' wal-fetch --store '/s' --partial %f %p");
    }

    #[test]
    fn target_times_parse_in_both_spellings() {
        let a = RecoveryTarget::parse_time("2026-01-02T03:04:05.250Z").unwrap();
        let b = RecoveryTarget::parse_time("2026-01-02 04:04:05.25+01").unwrap();
        assert_eq!(a, b);
        let settings = a.settings();
        assert_eq!(
            settings[0],
            (
                "recovery_target_time",
                "2026-01-02 03:04:05.250000+00".to_owned()
            )
        );
        assert!(RecoveryTarget::parse_time("yesterday").is_err());
        assert!(RecoveryTarget::parse_time("2026-01-02 03:04:05").is_err());
    }
}
