//! The data format: header, and the STREAM segmenter and reader over AES-256-GCM.
//!
//! The spec is in the [crate docs](crate#the-format-version-1); this module is its one
//! implementation. `SegmentWriter` and `SegmentReader` each hold one segment (64 KiB plus
//! a tag) in memory, whatever the size of the stream.

use std::fmt;
use std::io::{self, Read, Write};

use ring::aead::{self, Aad, LessSafeKey, Nonce};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, into_io};
use crate::key::{KeyId, KeyRing, MasterKey, random_array};

/// The first 8 bytes of every backup's data (PNG-style: a non-ASCII byte, then the name, then
/// CR LF, ^Z, so text-mode transfers and `type`-ing the file are caught).
pub const MAGIC: [u8; 8] = *b"\x89HADR\r\n\x1a";
/// The format version this build writes and the only one it reads.
pub const FORMAT_VERSION: u8 = 1;
/// Compression id: none.
pub const COMPRESSION_NONE: u8 = 0;
/// Compression id: zstd (one or more frames).
pub const COMPRESSION_ZSTD: u8 = 1;
/// Cipher id: AES-256-GCM in the STREAM construction, data key from HKDF-SHA-256.
pub const CIPHER_AES_256_GCM_STREAM: u8 = 1;
/// Plaintext bytes per segment (every segment but the last holds exactly this many).
pub const SEGMENT_SIZE: u32 = 64 * 1024;
/// Bytes of the AES-GCM tag after each segment.
pub const TAG_LEN: usize = 16;
/// Bytes of the random HKDF salt in the header.
pub const SALT_LEN: usize = 32;
/// Segment sizes a reader accepts (a header may only name one within these bounds, so that
/// reading stays bounded in memory).
const SEGMENT_SIZE_RANGE: std::ops::RangeInclusive<u32> = 1024..=(4 << 20);
const FLAG_LAST: u8 = 1;

/// The id of one backup: 1 to 128 characters of `[A-Za-z0-9._-]`, not starting with `.`.
/// Generated ids read `<kind>-<UTC time>-<8 hex digits>`, e.g.
/// `dir-20260102T030405Z-9f3a1c07`, and sort by time within a kind.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId(String);

impl BackupId {
    /// Parses an id.
    pub fn parse(text: &str) -> Result<Self> {
        let ok = !text.is_empty()
            && text.len() <= 128
            && !text.starts_with('.')
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(Error::InvalidBackupId {
                id: text.to_owned(),
            })
        }
    }

    /// A fresh id for a backup of `kind` made at `at`.
    pub fn generate(kind: &str, at: std::time::SystemTime) -> Result<Self> {
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let suffix: [u8; 4] = random_array()?;
        Self::parse(&format!(
            "{kind}-{:04}{:02}{:02}T{:02}{:02}{:02}Z-{}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            hex::encode(suffix)
        ))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for BackupId {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Self::parse(&value)
    }
}

impl From<BackupId> for String {
    fn from(id: BackupId) -> Self {
        id.0
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackupId({})", self.0)
    }
}

impl std::str::FromStr for BackupId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// The header that opens a backup's data, and the associated data of every segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) compression: u8,
    pub(crate) segment_size: u32,
    pub(crate) key_id: KeyId,
    pub(crate) salt: [u8; SALT_LEN],
    pub(crate) backup_id: BackupId,
}

impl Header {
    /// A header for a new backup written with `key`, with a fresh salt.
    pub(crate) fn new(key: &MasterKey, backup_id: BackupId, compression: u8) -> Result<Self> {
        Ok(Self {
            compression,
            segment_size: SEGMENT_SIZE,
            key_id: key.id().clone(),
            salt: random_array()?,
            backup_id,
        })
    }

    /// The header's bytes, exactly as stored and authenticated.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.backup_id.as_str().len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[
            FORMAT_VERSION,
            self.compression,
            CIPHER_AES_256_GCM_STREAM,
            0,
        ]);
        out.extend_from_slice(&self.segment_size.to_le_bytes());
        out.extend_from_slice(&self.salt);
        for text in [self.key_id.as_str(), self.backup_id.as_str()] {
            // Both are validated to at most 128 bytes.
            out.push(u8::try_from(text.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(text.as_bytes());
        }
        out
    }

    /// Reads and checks a header; returns it and its raw bytes. `expected` names the backup
    /// in errors before the header's own id is known.
    pub(crate) fn read_from(
        reader: &mut impl Read,
        expected: &BackupId,
    ) -> Result<(Self, Vec<u8>)> {
        let corrupt = |detail: &str| Error::corrupt(expected.as_str(), format!("header: {detail}"));
        let read_io = |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt("truncated")
            } else {
                crate::error::from_io(e, || format!("read header of backup {expected}"))
            }
        };
        let mut raw = vec![0u8; 16 + SALT_LEN + 1];
        reader.read_exact(&mut raw).map_err(read_io)?;
        if raw[..8] != MAGIC {
            return Err(corrupt("bad magic: not an ha-dr backup"));
        }
        if raw[8] != FORMAT_VERSION {
            return Err(Error::UnsupportedFormat {
                backup_id: expected.to_string(),
                detail: format!(
                    "format version {} (this build reads {FORMAT_VERSION})",
                    raw[8]
                ),
            });
        }
        let compression = raw[9];
        if compression != COMPRESSION_NONE && compression != COMPRESSION_ZSTD {
            return Err(Error::UnsupportedFormat {
                backup_id: expected.to_string(),
                detail: format!("compression id {compression}"),
            });
        }
        if raw[10] != CIPHER_AES_256_GCM_STREAM {
            return Err(Error::UnsupportedFormat {
                backup_id: expected.to_string(),
                detail: format!("cipher id {}", raw[10]),
            });
        }
        if raw[11] != 0 {
            return Err(corrupt("reserved byte is not zero"));
        }
        let segment_size = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        if !SEGMENT_SIZE_RANGE.contains(&segment_size) {
            return Err(corrupt(&format!(
                "segment size {segment_size} out of range"
            )));
        }
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&raw[16..16 + SALT_LEN]);
        let key_len = usize::from(raw[16 + SALT_LEN]);
        let mut key_id = vec![0u8; key_len];
        reader.read_exact(&mut key_id).map_err(read_io)?;
        raw.extend_from_slice(&key_id);
        let mut id_len = [0u8; 1];
        reader.read_exact(&mut id_len).map_err(read_io)?;
        raw.push(id_len[0]);
        let mut backup_id = vec![0u8; usize::from(id_len[0])];
        reader.read_exact(&mut backup_id).map_err(read_io)?;
        raw.extend_from_slice(&backup_id);
        let key_id = std::str::from_utf8(&key_id)
            .ok()
            .and_then(KeyId::parse)
            .ok_or_else(|| corrupt("invalid key id"))?;
        let backup_id = std::str::from_utf8(&backup_id)
            .ok()
            .and_then(|s| BackupId::parse(s).ok())
            .ok_or_else(|| corrupt("invalid backup id"))?;
        if &backup_id != expected {
            return Err(corrupt(&format!(
                "the data belongs to backup {backup_id}, not {expected}"
            )));
        }
        Ok((
            Self {
                compression,
                segment_size,
                key_id,
                salt,
                backup_id,
            },
            raw,
        ))
    }
}

/// The nonce of segment `counter`: an 11-byte big-endian counter, then the last-segment flag.
fn nonce(counter: u64, last: bool) -> Nonce {
    let mut bytes = [0u8; aead::NONCE_LEN];
    bytes[3..11].copy_from_slice(&counter.to_be_bytes());
    bytes[11] = if last { FLAG_LAST } else { 0 };
    Nonce::assume_unique_for_key(bytes)
}

/// Encrypts a plaintext stream into segments after writing the header.
///
/// A full segment is sealed only once a byte beyond it arrives, so that the last segment
/// may be full and carries the last flag; [`finish`](Self::finish) seals it.
///
/// A writer that saw an error (the store's disk full, a failed seal) is broken: what reached
/// the store is unknown, so every later `write`, `flush` or `finish` fails instead of going
/// on from a half-written segment.
pub(crate) struct SegmentWriter<W: Write> {
    inner: W,
    failed: bool,
    key: LessSafeKey,
    aad: Vec<u8>,
    segment_size: usize,
    buf: Vec<u8>,
    counter: u64,
    stored: u64,
}

impl<W: Write> SegmentWriter<W> {
    /// Writes `header` to `inner` and returns a writer for the plaintext.
    pub(crate) fn new(mut inner: W, header: &Header, key: &MasterKey) -> io::Result<Self> {
        let aad = header.encode();
        inner.write_all(&aad)?;
        let segment_size = header.segment_size as usize;
        Ok(Self {
            inner,
            key: key.data_key(&header.salt, header.backup_id.as_str()),
            stored: aad.len() as u64,
            aad,
            segment_size,
            buf: Vec::with_capacity(segment_size + TAG_LEN),
            counter: 0,
            failed: false,
        })
    }

    /// Fails if an earlier operation failed.
    fn usable(&self) -> io::Result<()> {
        if self.failed {
            Err(io::Error::other(
                "the backup data writer failed earlier; nothing more can be written",
            ))
        } else {
            Ok(())
        }
    }

    /// Runs `op`; an error breaks the writer for good.
    fn guarded<T>(&mut self, op: impl FnOnce(&mut Self) -> io::Result<T>) -> io::Result<T> {
        self.usable()?;
        let result = op(self);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn seal(&mut self, last: bool) -> io::Result<()> {
        let tag = self
            .key
            .seal_in_place_separate_tag(
                nonce(self.counter, last),
                Aad::from(self.aad.as_slice()),
                &mut self.buf,
            )
            .map_err(|_| io::Error::other("AES-GCM seal failed"))?;
        self.buf.extend_from_slice(tag.as_ref());
        self.inner.write_all(&self.buf)?;
        self.stored += self.buf.len() as u64;
        self.buf.clear();
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| io::Error::other("segment counter overflow"))?;
        Ok(())
    }

    /// Seals the last segment (empty only if the whole stream was) and flushes; returns the
    /// inner writer and the number of bytes written to it (header included).
    pub(crate) fn finish(mut self) -> io::Result<(W, u64)> {
        self.guarded(|w| {
            w.seal(true)?;
            w.inner.flush()
        })?;
        Ok((self.inner, self.stored))
    }
}

impl<W: Write> Write for SegmentWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.guarded(|w| {
            let mut data = data;
            let total = data.len();
            while !data.is_empty() {
                if w.buf.len() == w.segment_size {
                    w.seal(false)?;
                }
                let take = (w.segment_size - w.buf.len()).min(data.len());
                w.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
            }
            Ok(total)
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        // A partial segment cannot be sealed early (it would be a short non-final segment).
        self.guarded(|w| w.inner.flush())
    }
}

/// Decrypts and authenticates segments, yielding plaintext; fails on the first segment that
/// does not authenticate, and at the end if the final segment was missing.
pub(crate) struct SegmentReader<R: Read> {
    inner: R,
    key: LessSafeKey,
    aad: Vec<u8>,
    backup_id: BackupId,
    segment_size: usize,
    buf: Vec<u8>,
    carry: Option<u8>,
    pos: usize,
    end: usize,
    counter: u64,
    done: bool,
    stored: u64,
}

impl<R: Read> SegmentReader<R> {
    /// Reads the header from `inner`, checks it names `expected`, and finds its key in `keys`.
    pub(crate) fn open(
        mut inner: R,
        expected: &BackupId,
        keys: &KeyRing,
    ) -> Result<(Self, Header)> {
        let (header, aad) = Header::read_from(&mut inner, expected)?;
        let master = keys.require(&header.key_id, expected.as_str())?;
        let segment_size = header.segment_size as usize;
        Ok((
            Self {
                inner,
                key: master.data_key(&header.salt, header.backup_id.as_str()),
                stored: aad.len() as u64,
                aad,
                backup_id: expected.clone(),
                segment_size,
                buf: Vec::with_capacity(segment_size + TAG_LEN + 1),
                carry: None,
                pos: 0,
                end: 0,
                counter: 0,
                done: false,
            },
            header,
        ))
    }

    /// Bytes read from the store so far (header included).
    #[cfg(test)]
    pub(crate) fn stored_bytes(&self) -> u64 {
        self.stored
    }

    /// Whether the final segment has been authenticated.
    #[cfg(test)]
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    fn next_segment(&mut self) -> Result<()> {
        let full = self.segment_size + TAG_LEN;
        self.buf.clear();
        self.buf.extend(self.carry.take());
        // One byte beyond a full segment tells whether another follows.
        while self.buf.len() < full + 1 {
            let have = self.buf.len();
            self.buf.resize(full + 1, 0);
            match self.inner.read(&mut self.buf[have..]) {
                Ok(0) => {
                    self.buf.truncate(have);
                    break;
                }
                Ok(n) => self.buf.truncate(have + n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.buf.truncate(have),
                Err(e) => {
                    self.buf.truncate(have);
                    return Err(crate::error::from_io(e, || {
                        format!("read data of backup {}", self.backup_id)
                    }));
                }
            }
        }
        let last = self.buf.len() <= full;
        if !last {
            self.carry = self.buf.pop();
        }
        let counter = self.counter;
        if self.buf.len() < TAG_LEN {
            return Err(Error::corrupt(
                self.backup_id.as_str(),
                if counter == 0 {
                    "no segments after the header (truncated)".to_owned()
                } else {
                    format!("segment {counter} is shorter than a tag (truncated)")
                },
            ));
        }
        self.stored += self.buf.len() as u64;
        let plain = self
            .key
            .open_in_place(
                nonce(counter, last),
                Aad::from(self.aad.as_slice()),
                &mut self.buf,
            )
            .map_err(|_| {
                Error::corrupt(
                    self.backup_id.as_str(),
                    if last {
                        format!(
                            "segment {counter} failed authentication as the final segment \
                             (modified, or the data was truncated or reordered)"
                        )
                    } else {
                        format!(
                            "segment {counter} failed authentication (modified, reordered, \
                             dropped or from another backup)"
                        )
                    },
                )
            })?
            .len();
        if last && counter > 0 && plain == 0 {
            // The writer never makes one (it seals a full segment only once more data
            // arrives), and the spec forbids it: an authentic but empty final segment after
            // full ones is a forgery by someone holding the key, or a broken writer.
            return Err(Error::corrupt(
                self.backup_id.as_str(),
                format!("segment {counter} is an empty final segment after full ones"),
            ));
        }
        self.pos = 0;
        self.end = plain;
        self.counter += 1;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for SegmentReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.end {
            if self.done || out.is_empty() {
                return Ok(0);
            }
            self.next_segment().map_err(into_io)?;
        }
        let n = (self.end - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring() -> KeyRing {
        KeyRing::new(MasterKey::from_bytes([9; 32]))
    }

    fn id(s: &str) -> BackupId {
        BackupId::parse(s).unwrap()
    }

    fn seal(data: &[u8], chunk: usize, segment_size: u32) -> Vec<u8> {
        let keys = ring();
        let mut header = Header::new(keys.writer(), id("b1"), COMPRESSION_NONE).unwrap();
        header.segment_size = segment_size;
        let mut w = SegmentWriter::new(Vec::new(), &header, keys.writer()).unwrap();
        for part in data.chunks(chunk.max(1)) {
            w.write_all(part).unwrap();
        }
        let (out, stored) = w.finish().unwrap();
        assert_eq!(stored, out.len() as u64);
        out
    }

    fn open(stored: &[u8]) -> Result<Vec<u8>> {
        let (mut r, _) = SegmentReader::open(stored, &id("b1"), &ring())?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)
            .map_err(|e| crate::error::from_io(e, || "read".into()))?;
        assert!(r.is_done());
        assert_eq!(r.stored_bytes(), stored.len() as u64);
        Ok(out)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any size, including 0 and exact multiples of the segment size, written in any
        /// chunking, round-trips; the stored size is header + data + one tag per segment.
        #[test]
        fn segmenter_round_trips(
            segments in 0usize..4,
            extra in prop_oneof![Just(0usize), Just(1), 0usize..1024],
            chunk in 1usize..3000,
            seed in any::<u8>(),
        ) {
            let size = segments * 1024 + extra;
            let data: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            let stored = seal(&data, chunk, 1024);
            let header_len = Header::new(ring().writer(), id("b1"), 0).unwrap().encode().len();
            let n_segments = size.div_ceil(1024).max(1);
            prop_assert_eq!(stored.len(), header_len + size + n_segments * TAG_LEN);
            prop_assert_eq!(open(&stored).unwrap(), data);
        }
    }

    #[test]
    fn the_default_segment_size_round_trips_at_its_boundaries() {
        let seg = SEGMENT_SIZE as usize;
        for size in [0, 1, seg - 1, seg, seg + 1, 2 * seg, 3 * seg + 17] {
            let data = vec![0xA5; size];
            assert_eq!(
                open(&seal(&data, 7000, SEGMENT_SIZE)).unwrap(),
                data,
                "{size}"
            );
        }
    }

    #[test]
    fn an_empty_final_segment_after_full_ones_is_refused() {
        let keys = ring();
        let mut header = Header::new(keys.writer(), id("b1"), COMPRESSION_NONE).unwrap();
        header.segment_size = 1024;
        let mut w = SegmentWriter::new(Vec::new(), &header, keys.writer()).unwrap();
        w.write_all(&[7; 1024]).unwrap();
        // What a broken writer would do: seal the full segment as non-final at once.
        w.seal(false).unwrap();
        let (stored, _) = w.finish().unwrap();
        let err = open(&stored).expect_err("an empty final segment after a full one");
        assert!(err.is_corruption(), "{err}");
        assert!(err.to_string().contains("empty final segment"), "{err}");
        // An empty stream is one empty final segment, and that is fine.
        assert_eq!(open(&seal(&[], 1, 1024)).unwrap(), Vec::<u8>::new());
    }

    /// A store that takes `room` bytes, then fails every write as a full disk does.
    struct Full {
        room: usize,
        took: Vec<u8>,
    }

    impl Write for Full {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
            }
            let n = data.len().min(self.room);
            self.room -= n;
            self.took.extend_from_slice(&data[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Finding 12: after a failed write (a full disk mid-segment) the writer refuses every
    /// further write and the finish, with an error, never a panic, and nothing more reaches
    /// the store. Before the fix, the next write underflowed `segment_size - buf.len()`
    /// (the sealed segment and its tag were still in the buffer) and panicked in debug.
    #[test]
    fn a_writer_that_failed_refuses_to_go_on() {
        let keys = ring();
        let mut header = Header::new(keys.writer(), id("b1"), COMPRESSION_NONE).unwrap();
        header.segment_size = 1024;
        let room = header.encode().len() + 100;
        let full = Full {
            room,
            took: Vec::new(),
        };
        let mut w = SegmentWriter::new(full, &header, keys.writer()).unwrap();
        w.write_all(&[1; 1024]).unwrap();
        let err = w
            .write_all(&[2; 10])
            .expect_err("the seal hits the full disk");
        assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
        for _ in 0..3 {
            let err = w.write(&[3; 2000]).expect_err("a broken writer refuses");
            assert!(err.to_string().contains("failed earlier"), "{err}");
        }
        assert!(w.flush().is_err());
        let err = w.finish().err().expect("finish refuses too");
        assert!(err.to_string().contains("failed earlier"), "{err}");
    }

    #[test]
    fn truncation_at_any_point_is_an_error() {
        let stored = seal(&vec![1u8; 3 * 1024 + 100], 500, 1024);
        for len in 0..stored.len() {
            let err = open(&stored[..len]).expect_err("truncated data must not open");
            assert!(err.is_corruption(), "{len}: {err}");
        }
    }

    #[test]
    fn a_wrong_id_or_key_is_refused() {
        let stored = seal(b"hello", 5, 1024);
        let err = SegmentReader::open(&stored[..], &id("b2"), &ring())
            .err()
            .unwrap();
        assert!(err.to_string().contains("belongs to backup b1"), "{err}");
        let other = KeyRing::new(MasterKey::from_bytes([8; 32]));
        let err = SegmentReader::open(&stored[..], &id("b1"), &other)
            .err()
            .unwrap();
        assert!(matches!(err, Error::MissingKey { .. }), "{err}");
        assert!(err.to_string().contains(ring().writer().id().as_str()));
    }

    #[test]
    fn backup_ids_are_validated() {
        assert!(BackupId::parse("dir-20260102T030405Z-9f3a1c07").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(129)] {
            assert!(BackupId::parse(bad).is_err(), "{bad:?}");
        }
        let id = BackupId::generate("dir", std::time::UNIX_EPOCH).unwrap();
        assert!(id.as_str().starts_with("dir-19700101T000000Z-"), "{id}");
    }
}
