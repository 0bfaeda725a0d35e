//! The streaming halves of a backup: [`BackupWriter`] (plaintext in: SHA-256, zstd,
//! segments, store) and [`BackupReader`] (store out: segments, zstd, SHA-256, checks).

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use ring::digest;

use crate::error::{Error, Result, from_io, into_io};
use crate::format::{
    BackupId, COMPRESSION_NONE, COMPRESSION_ZSTD, FORMAT_VERSION, Header, SEGMENT_SIZE,
    SegmentReader, SegmentWriter,
};
use crate::key::{KeyRing, MasterKey};
use crate::manifest::{BackupKind, Compression, Details, Manifest};
use crate::progress::Progress;
use crate::store::{BackupStore, DataWriter};

/// How the writer compresses.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Compress {
    /// zstd level; 0 means no compression.
    pub(crate) level: i32,
    /// zstd worker threads (0: compress on the calling thread).
    pub(crate) workers: u32,
}

type Segments = SegmentWriter<Box<dyn DataWriter>>;

/// Bytes of input per zstd worker job when compressing on several threads.
const MT_JOB_SIZE: u32 = 1 << 20;

enum Sink {
    Zstd(zstd::stream::write::Encoder<'static, Segments>),
    Plain(Segments),
}

/// What a finished writer wrote.
#[derive(Debug, Clone)]
pub(crate) struct Written {
    pub(crate) plaintext_bytes: u64,
    pub(crate) stored_bytes: u64,
    pub(crate) sha256: String,
    pub(crate) compression: Compression,
}

/// Takes the source stream; [`finish`](Self::finish) commits the data (still invisible until
/// the manifest is stored). Dropping it unfinished discards everything.
pub(crate) struct BackupWriter {
    progress: Option<Progress>,
    sink: Sink,
    sha: digest::Context,
    plaintext: u64,
    compression: Compression,
    id: BackupId,
}

impl BackupWriter {
    pub(crate) fn new(
        store: &dyn BackupStore,
        id: &BackupId,
        key: &MasterKey,
        compress: Compress,
    ) -> Result<Self> {
        let algorithm = if compress.level == 0 {
            COMPRESSION_NONE
        } else {
            COMPRESSION_ZSTD
        };
        let header = Header::new(key, id.clone(), algorithm)?;
        let data = store.create_data(id)?;
        let segments = SegmentWriter::new(data, &header, key)
            .map_err(|e| from_io(e, || format!("write header of backup {id}")))?;
        let zstd_err = |e| from_io(e, || format!("set up zstd for backup {id}"));
        let (sink, compression) = if algorithm == COMPRESSION_ZSTD {
            let mut encoder =
                zstd::stream::write::Encoder::new(segments, compress.level).map_err(zstd_err)?;
            // The SHA-256 and the AEAD tags already cover integrity.
            encoder.include_checksum(false).map_err(zstd_err)?;
            if compress.workers > 0 {
                encoder.multithread(compress.workers).map_err(zstd_err)?;
                // zstd's default job (4 windows, 8 MiB at level 3) per worker costs ~80 MiB
                // of RSS with 2 workers; 1 MiB jobs keep both cores busy in a fraction of it.
                encoder
                    .set_parameter(zstd::zstd_safe::CParameter::JobSize(MT_JOB_SIZE))
                    .map_err(zstd_err)?;
            }
            (
                Sink::Zstd(encoder),
                Compression {
                    algorithm: "zstd".into(),
                    level: compress.level,
                },
            )
        } else {
            (
                Sink::Plain(segments),
                Compression {
                    algorithm: "none".into(),
                    level: 0,
                },
            )
        };
        Ok(Self {
            progress: None,
            sink,
            sha: digest::Context::new(&digest::SHA256),
            plaintext: 0,
            compression,
            id: id.clone(),
        })
    }

    /// Counts the plaintext bytes written into `progress`.
    pub(crate) fn with_progress(mut self, progress: Option<Progress>) -> Self {
        self.progress = progress;
        self
    }

    /// Ends the stream, seals the last segment and commits the data.
    pub(crate) fn finish(self) -> Result<Written> {
        let id = self.id;
        let err = |e| from_io(e, || format!("finish data of backup {id}"));
        let segments = match self.sink {
            Sink::Zstd(encoder) => encoder.finish().map_err(err)?,
            Sink::Plain(segments) => segments,
        };
        let (data, stored_bytes) = segments.finish().map_err(err)?;
        data.commit()?;
        Ok(Written {
            plaintext_bytes: self.plaintext,
            stored_bytes,
            sha256: hex::encode(self.sha.finish().as_ref()),
            compression: self.compression,
        })
    }
}

impl Write for BackupWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &mut self.sink {
            Sink::Zstd(encoder) => encoder.write(buf)?,
            Sink::Plain(segments) => segments.write(buf)?,
        };
        self.sha.update(&buf[..n]);
        self.plaintext += n as u64;
        if let Some(progress) = &self.progress {
            progress.add(n);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Zstd(encoder) => encoder.flush(),
            Sink::Plain(segments) => segments.flush(),
        }
    }
}

/// Writes one object into the store: `fill` streams its plaintext into the writer and says
/// what the manifest's details are; then the data is committed and the sealed manifest
/// stored (the object exists once its manifest does).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_object(
    store: &dyn BackupStore,
    key: &MasterKey,
    compress: Compress,
    progress: Option<Progress>,
    id: &BackupId,
    kind: BackupKind,
    source_description: String,
    tags: Vec<String>,
    fill: impl FnOnce(&mut BackupWriter) -> Result<Details>,
) -> Result<Manifest> {
    let created = SystemTime::now();
    let clock = Instant::now();
    let mut writer = BackupWriter::new(store, id, key, compress)?.with_progress(progress);
    let details = fill(&mut writer)?;
    let written = writer.finish()?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        id: id.clone(),
        kind,
        source: source_description,
        tags,
        created,
        duration: clock.elapsed(),
        plaintext_bytes: written.plaintext_bytes,
        stored_bytes: written.stored_bytes,
        plaintext_sha256: written.sha256,
        compression: written.compression,
        cipher: "aes-256-gcm-stream".into(),
        segment_size: SEGMENT_SIZE,
        key_id: key.id().clone(),
        details,
    };
    store.put_manifest(id, &manifest.seal(key)?)?;
    Ok(manifest)
}

/// Counts bytes read from the store, shared with the [`BackupReader`] above the decoder.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Yields the plaintext of a backup, authenticating as it goes. At the end of the stream it
/// checks the final segment, the stored size, the plaintext size and the SHA-256 against the
/// (authenticated) manifest, and fails instead of reporting the end if any differs.
pub(crate) struct BackupReader {
    progress: Option<Progress>,
    inner: Box<dyn Read + Send>,
    manifest: Manifest,
    stored: Arc<AtomicU64>,
    /// `None` while [`read_ahead`] hashes on a thread of its own.
    sha: Option<digest::Context>,
    plaintext: u64,
    checked: bool,
}

impl BackupReader {
    /// Authenticates the manifest of `id`, then opens its data and checks the header agrees.
    pub(crate) fn open(store: &dyn BackupStore, keys: &KeyRing, id: &BackupId) -> Result<Self> {
        let manifest = Manifest::open(&store.get_manifest(id)?, id, keys)?;
        let stored = Arc::new(AtomicU64::new(0));
        let data = Counting {
            inner: store.open_data(id)?,
            count: Arc::clone(&stored),
        };
        let (segments, header) = SegmentReader::open(data, id, keys)?;
        if header.key_id != manifest.key_id || header.segment_size != manifest.segment_size {
            return Err(Error::corrupt(
                id.as_str(),
                "the data header and the manifest disagree on key or segment size",
            ));
        }
        let zstd_manifest = manifest.compression.algorithm == "zstd";
        if zstd_manifest != (header.compression == COMPRESSION_ZSTD) {
            return Err(Error::corrupt(
                id.as_str(),
                "the data header and the manifest disagree on compression",
            ));
        }
        let inner: Box<dyn Read + Send> = if header.compression == COMPRESSION_ZSTD {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(io::BufReader::with_capacity(
                    64 * 1024,
                    segments,
                ))
                .map_err(|e| from_io(e, || format!("set up zstd for backup {id}")))?,
            )
        } else {
            Box::new(segments)
        };
        Ok(Self {
            progress: None,
            inner,
            manifest,
            stored,
            sha: Some(digest::Context::new(&digest::SHA256)),
            plaintext: 0,
            checked: false,
        })
    }

    /// Counts the plaintext bytes read (and checked) into `progress`.
    pub(crate) fn with_progress(mut self, progress: Option<Progress>) -> Self {
        self.progress = progress;
        self
    }

    /// The authenticated manifest.
    pub(crate) fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn corrupt(&self, detail: String) -> io::Error {
        into_io(Error::corrupt(self.manifest.id.as_str(), detail))
    }

    fn check_end(&mut self) -> io::Result<()> {
        let m = &self.manifest;
        let stored = self.stored.load(Ordering::Relaxed);
        if stored != m.stored_bytes {
            return Err(self.corrupt(format!(
                "stored size is {stored} bytes, the manifest says {}",
                m.stored_bytes
            )));
        }
        if self.plaintext != m.plaintext_bytes {
            return Err(self.corrupt(format!(
                "plaintext is {} bytes, the manifest says {}",
                self.plaintext, m.plaintext_bytes
            )));
        }
        // With the hashing deferred, the stream counts as checked only once `read_ahead`
        // has checked the digest too.
        if let Some(sha) = &self.sha {
            self.check_sha(sha.clone().finish())?;
            self.checked = true;
        }
        Ok(())
    }

    fn check_sha(&self, digest: digest::Digest) -> io::Result<()> {
        let sha = hex::encode(digest.as_ref());
        if sha != self.manifest.plaintext_sha256 {
            return Err(self.corrupt(format!(
                "plaintext SHA-256 is {sha}, the manifest says {}",
                self.manifest.plaintext_sha256
            )));
        }
        Ok(())
    }

    /// Reads (and checks) whatever is left, discarding it; after this the whole backup has
    /// been verified. Consumers that stop early (tar stops at its end marker) call it.
    pub(crate) fn drain(&mut self) -> Result<()> {
        let id = self.manifest.id.clone();
        copy_large(self, &mut io::sink())
            .map_err(|e| from_io(e, || format!("read backup {id}")))?;
        Ok(())
    }
}

impl Read for BackupReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.checked || buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.check_end()?;
            return Ok(0);
        }
        if let Some(sha) = &mut self.sha {
            sha.update(&buf[..n]);
        }
        self.plaintext += n as u64;
        if let Some(progress) = &self.progress {
            progress.add(n);
        }
        if self.plaintext > self.manifest.plaintext_bytes {
            return Err(self.corrupt(format!(
                "plaintext is longer than the {} bytes the manifest says",
                self.manifest.plaintext_bytes
            )));
        }
        Ok(n)
    }
}

/// How much plaintext the read-ahead thread decodes per chunk, and how many chunks it may be
/// ahead of the consumer (and of the hashing thread): 1 MiB in flight at most.
const AHEAD_CHUNK: usize = 256 * 1024;
const AHEAD_DEPTH: usize = 4;

type Chunk = Arc<Vec<u8>>;

/// Runs `consume` on the plaintext of `reader` while a second thread reads (decrypts,
/// decompresses) ahead of it and a third computes the SHA-256, so a restore spreads over the
/// cores: one decodes, one hashes, one writes files. Whatever `consume` leaves unread is
/// read too; the end of the stream reaches `consume` only after every segment, the sizes
/// and the SHA-256 have been checked, so on `Ok` everything was. A reader error reaches
/// `consume` as an `io::Error` carrying the crate error, exactly as a direct read would.
pub(crate) fn read_ahead<T>(
    reader: &mut BackupReader,
    consume: impl FnOnce(&mut dyn Read) -> Result<T>,
) -> Result<T> {
    let id = reader.manifest().id.clone();
    // The reader stops hashing; the hashing thread's digest is checked at the end instead.
    let hashed_before = reader.sha.take();
    let decoding = &mut *reader;
    let result = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Chunk>>(AHEAD_DEPTH);
        let (to_hash, hash_rx) = std::sync::mpsc::sync_channel::<Chunk>(AHEAD_DEPTH);
        let hasher = scope.spawn(move || {
            let mut sha = hashed_before.unwrap_or_else(|| digest::Context::new(&digest::SHA256));
            for chunk in hash_rx {
                sha.update(&chunk);
            }
            sha.finish()
        });
        scope.spawn(move || {
            loop {
                let mut chunk = vec![0u8; AHEAD_CHUNK];
                let result = match fill(decoding, &mut chunk) {
                    Ok(0) => {
                        // Sizes were checked at the reader's end; now the SHA-256.
                        drop(to_hash);
                        let checked = hasher
                            .join()
                            .map_err(|_| io::Error::other("the hashing thread panicked"))
                            .and_then(|digest| decoding.check_sha(digest));
                        decoding.checked = checked.is_ok();
                        let _ = tx.send(checked.map(|()| Arc::new(Vec::new())));
                        return;
                    }
                    Ok(n) => {
                        chunk.truncate(n);
                        Ok(Arc::new(chunk))
                    }
                    Err(e) => Err(e),
                };
                let failed = result.is_err();
                if let Ok(chunk) = &result
                    && to_hash.send(Arc::clone(chunk)).is_err()
                {
                    return;
                }
                // A closed channel means the consumer failed and gave up: stop reading.
                if tx.send(result).is_err() || failed {
                    return;
                }
            }
        });
        let mut ahead = Ahead {
            rx,
            chunk: Arc::new(Vec::new()),
            pos: 0,
            done: false,
        };
        let value = consume(&mut ahead)?;
        copy_large(&mut ahead, &mut io::sink())
            .map_err(|e| from_io(e, || format!("read backup {id}")))?;
        Ok(value)
    });
    if !reader.checked {
        // Read no further unchecked: a fresh hash fails any later end of stream.
        reader.sha = Some(digest::Context::new(&digest::SHA256));
    }
    result
}

/// Bytes per read and write of [`copy_large`].
const COPY_CHUNK: usize = 256 * 1024;

/// `io::copy` with 256 KiB reads and writes instead of its 8 KiB buffer: a 16 MiB WAL
/// segment in 64 writes, not 2048.
pub(crate) fn copy_large(reader: &mut dyn Read, writer: &mut dyn Write) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut total = 0u64;
    loop {
        let n = fill(reader, &mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        writer.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
pub(crate) fn fill(reader: &mut (impl Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The consumer's end of [`read_ahead`].
struct Ahead {
    rx: std::sync::mpsc::Receiver<io::Result<Chunk>>,
    chunk: Chunk,
    pos: usize,
    done: bool,
}

impl Read for Ahead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) if chunk.is_empty() => self.done = true,
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Err(io::Error::other("the read-ahead thread stopped"));
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
