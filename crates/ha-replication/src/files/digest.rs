//! Streaming SHA-256 (ring) in bounded memory: one reusable buffer per thread, never a whole
//! file in memory.

use std::cell::Cell;
use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Default size of the read buffer used to hash and copy files (256 KiB).
pub const DEFAULT_BUFFER_SIZE: usize = 256 * 1024;

/// A SHA-256 digest. Shown, serialized and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    /// The digest with these bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest's bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest of `data` (for data already in memory; files go through [`hash_reader`]).
    pub fn of(data: &[u8]) -> Self {
        let mut hasher = Hasher::new();
        hasher.update(data);
        hasher.finish()
    }
}

impl Sha256 {
    /// The 64 lowercase hex digits, into a stack buffer (manifests hold one per file, so
    /// formatting byte by byte through `write!` would dominate writing them).
    fn hex(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        // 32 bytes always fit 64 digits.
        let _ = hex::encode_to_slice(self.0, &mut out);
        out
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.hex();
        // Only ASCII digits and letters were written.
        f.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

/// The text was not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a SHA-256 digest is 64 hex digits, got {0:?}")]
pub struct ParseSha256Error(String);

impl FromStr for Sha256 {
    type Err = ParseSha256Error;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ParseSha256Error(text.chars().take(80).collect());
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| bad())?;
        Ok(Self(bytes))
    }
}

impl Serialize for Sha256 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let hex = self.hex();
        let text = std::str::from_utf8(&hex).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(text)
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = Sha256;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a SHA-256 digest in 64 hex digits")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Sha256, E> {
                text.parse().map_err(E::custom)
            }
        }
        // Borrowed when the format allows: no String per digest.
        deserializer.deserialize_str(Hex)
    }
}

/// An incremental SHA-256 that also counts the bytes it saw.
pub(crate) struct Hasher {
    context: Context,
    len: u64,
}

impl Hasher {
    pub(crate) fn new() -> Self {
        Self {
            context: Context::new(&SHA256),
            len: 0,
        }
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        self.context.update(data);
        self.len += data.len() as u64;
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn finish(self) -> Sha256 {
        let digest = self.context.finish();
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Sha256(bytes)
    }
}

/// Reads `reader` to its end through `buffer` and returns the SHA-256 of what it gave and how
/// many bytes that was. Memory use is the buffer, whatever the size of the stream.
pub fn hash_reader<R: Read + ?Sized>(
    reader: &mut R,
    buffer: &mut [u8],
) -> io::Result<(Sha256, u64)> {
    let mut hasher = Hasher::new();
    loop {
        match reader.read(buffer) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buffer[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = hasher.len();
    Ok((hasher.finish(), len))
}

thread_local! {
    // One buffer per thread, reused across files: zeroing 256 KiB for each of many small files
    // would cost more than hashing them.
    static BUFFER: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` with this thread's reusable buffer, at least `size` bytes long. A nested call
/// gets a fresh buffer rather than panicking.
pub(crate) fn with_buffer<T>(size: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    let mut buffer = BUFFER.take();
    if buffer.len() < size {
        buffer.resize(size, 0);
    }
    let out = f(&mut buffer[..size]);
    BUFFER.set(buffer);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests_and_hex_round_trip() {
        let empty = Sha256::of(b"");
        assert_eq!(
            empty.to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(empty.to_string().parse::<Sha256>(), Ok(empty));
        assert!("e3b0".parse::<Sha256>().is_err());
        assert!("zz".repeat(32).parse::<Sha256>().is_err());
        assert_eq!(
            empty.to_string().to_uppercase().parse::<Sha256>(),
            Ok(empty),
            "upper case is read too"
        );
        assert!("é".repeat(32).parse::<Sha256>().is_err());
        let json = serde_json::to_string(&empty).unwrap();
        assert_eq!(serde_json::from_str::<Sha256>(&json).unwrap(), empty);
    }

    #[test]
    fn streaming_equals_one_shot_whatever_the_buffer() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for size in [1, 7, 4096, 1 << 20] {
            let mut buffer = vec![0; size];
            let (digest, len) = hash_reader(&mut data.as_slice(), &mut buffer).unwrap();
            assert_eq!(digest, Sha256::of(&data));
            assert_eq!(len, data.len() as u64);
        }
    }

    #[test]
    fn nested_buffers_do_not_alias() {
        with_buffer(16, |outer| {
            outer.fill(1);
            with_buffer(16, |inner| inner.fill(2));
            assert!(outer.iter().all(|b| *b == 1));
        });
    }
}
