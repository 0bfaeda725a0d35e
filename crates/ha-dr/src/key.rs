//! Master keys, their ids, and the [`KeyRing`] of keys a process may read and write with.
//!
//! A master key is 32 random bytes. Its [`KeyId`] is derived from it (the first 8 bytes of
//! SHA-256 over a domain string and the key, in hex), so a key file holds nothing but the key
//! and the id printed by `keygen` is the id every backup written with it names. The master key
//! never encrypts data itself: each backup's data key is derived from it with HKDF-SHA-256
//! over a fresh random salt (see the [format](crate#the-format-version-1)), and manifests are
//! authenticated with an HMAC key derived with another HKDF label.

use std::fmt;
use std::io::Write;
use std::path::Path;

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{aead, digest, hkdf, hmac};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Length of a master key in bytes.
pub const KEY_LEN: usize = 32;

/// The environment variable [`MasterKey::from_env`] reads by default.
pub const KEY_ENV: &str = "HA_DR_KEY";

const KEY_ID_DOMAIN: &[u8] = b"ha-dr key id v1\0";
const DATA_KEY_INFO: &[u8] = b"ha-dr v1 data key\0";
const MANIFEST_SEAL_INFO: &[u8] = b"ha-dr v2 manifest key\0";
const MANIFEST_KEY_SALT: &[u8] = b"ha-dr v1 manifest salt";
const MANIFEST_KEY_INFO: &[u8] = b"ha-dr v1 manifest key";

/// The id of a master key: 16 lower-case hex digits derived from the key.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(String);

impl KeyId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses an id read from a header or manifest: 1 to 64 characters of `[0-9a-z]`.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let ok = !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
        ok.then(|| Self(text.to_owned()))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

/// A 32-byte master key and its id. `Debug` shows the id only; the bytes are wiped from
/// memory when the key is dropped (every clone wipes its own copy).
#[derive(Clone)]
pub struct MasterKey {
    id: KeyId,
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

/// Every field that holds key material wipes itself on drop.
impl zeroize::ZeroizeOnDrop for MasterKey {}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(KEY_ID_DOMAIN);
        ctx.update(&bytes);
        let id = KeyId(hex::encode(&ctx.finish().as_ref()[..8]));
        Self {
            id,
            bytes: Zeroizing::new(bytes),
        }
    }

    /// A fresh key from the system's CSPRNG.
    pub fn generate() -> Result<Self> {
        Ok(Self::from_bytes(random_array()?))
    }

    /// A key from text: 64 hex digits or the standard base64 of 32 bytes (surrounding
    /// whitespace ignored). `origin` names where the text came from, for errors.
    pub fn from_text(origin: &str, text: &str) -> Result<Self> {
        let text = text.trim();
        let invalid = |detail: String| Error::InvalidKey {
            origin: origin.to_owned(),
            detail,
        };
        // Every copy of the key's bytes is wiped when dropped.
        let bytes = Zeroizing::new(
            if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
                hex::decode(text).map_err(|e| invalid(e.to_string()))?
            } else {
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|_| {
                        invalid(format!(
                            "expected {} hex digits or the base64 of {KEY_LEN} bytes",
                            2 * KEY_LEN
                        ))
                    })?
            },
        );
        Self::from_slice(&bytes)
            .ok_or_else(|| invalid(format!("expected {KEY_LEN} bytes, got {}", bytes.len())))
    }

    /// A key from exactly [`KEY_LEN`] bytes, else `None`.
    fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut array = Zeroizing::new([0u8; KEY_LEN]);
        if bytes.len() != KEY_LEN {
            return None;
        }
        array.copy_from_slice(bytes);
        Some(Self::from_bytes(*array))
    }

    /// A key from the environment variable `var` (hex or base64, see
    /// [`from_text`](Self::from_text)).
    pub fn from_env(var: &str) -> Result<Self> {
        let origin = format!("in environment variable {var}");
        let text = Zeroizing::new(std::env::var(var).map_err(|e| Error::InvalidKey {
            origin: origin.clone(),
            detail: e.to_string(),
        })?);
        Self::from_text(&origin, &text)
    }

    /// Reads a key file: exactly 32 raw bytes, as [`keygen`](Self::keygen) writes. Refuses a
    /// file that its group or others may read or write (anything looser than `0600`), as ssh
    /// does with private keys: whoever can read it can read every backup.
    pub fn load(path: &Path) -> Result<Self> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let mut file =
            std::fs::File::open(path).map_err(|e| Error::io("open key file", path, e))?;
        let mode = file
            .metadata()
            .map_err(|e| Error::io("stat key file", path, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(Error::InvalidKey {
                origin: format!("file {}", path.display()),
                detail: format!(
                    "its mode {:04o} lets group or others at it; `chmod 600` it",
                    mode & 0o7777
                ),
            });
        }
        // Room for one byte more than a key, so a longer file is caught without growing (and
        // so copying, unwiped) the buffer.
        let mut bytes = Zeroizing::new(Vec::with_capacity(KEY_LEN + 1));
        (&mut file)
            .take(KEY_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io("read key file", path, e))?;
        Self::from_slice(&bytes).ok_or_else(|| Error::InvalidKey {
            origin: format!("file {}", path.display()),
            detail: format!(
                "a key file holds exactly {KEY_LEN} bytes, this one {}",
                if bytes.len() > KEY_LEN {
                    format!("more than {KEY_LEN}")
                } else {
                    bytes.len().to_string()
                }
            ),
        })
    }

    /// Creates a new key file at `path` with mode 0600 and returns the key. Refuses to
    /// overwrite an existing file: losing a key loses every backup written with it.
    pub fn keygen(path: &Path) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let key = Self::generate()?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io("create key file (it must not exist yet)", path, e))?;
        file.write_all(&*key.bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("write key file", path, e))?;
        crate::store::sync_parent(path)?;
        Ok(key)
    }

    /// The key's id.
    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// The AES-256-GCM key of one backup: HKDF-SHA-256 with `salt`, over this key, with info
    /// `"ha-dr v1 data key\0" || backup id`.
    pub(crate) fn data_key(&self, salt: &[u8], backup_id: &str) -> aead::LessSafeKey {
        self.aead_key(salt, DATA_KEY_INFO, backup_id)
    }

    /// The AES-256-GCM key that seals one manifest (version 2): derived as a data key is,
    /// HKDF-SHA-256 with the manifest's own `salt`, info `"ha-dr v2 manifest key\0" ||
    /// backup id`.
    pub(crate) fn manifest_seal_key(&self, salt: &[u8], backup_id: &str) -> aead::LessSafeKey {
        self.aead_key(salt, MANIFEST_SEAL_INFO, backup_id)
    }

    /// HKDF-SHA-256 with `salt` over this key, info `domain || backup id`, as an AES-256-GCM
    /// key: the one derivation behind every per-backup key.
    fn aead_key(&self, salt: &[u8], domain: &[u8], backup_id: &str) -> aead::LessSafeKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&*self.bytes);
        let info = [domain, backup_id.as_bytes()];
        // `expand` fails only for outputs longer than 255 hash lengths; 32 bytes never are.
        match prk
            .expand(&info, &aead::AES_256_GCM)
            .map(aead::UnboundKey::from)
        {
            Ok(key) => aead::LessSafeKey::new(key),
            Err(_) => unreachable_hkdf(),
        }
    }

    /// The HMAC-SHA-256 key that authenticated version 1 manifests.
    pub(crate) fn manifest_key(&self) -> hmac::Key {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, MANIFEST_KEY_SALT).extract(&*self.bytes);
        let info = [MANIFEST_KEY_INFO];
        match prk.expand(&info, hmac::HMAC_SHA256) {
            Ok(okm) => hmac::Key::from(okm),
            Err(_) => unreachable_hkdf(),
        }
    }
}

#[cold]
fn unreachable_hkdf() -> ! {
    panic!("HKDF-SHA-256 refused a 32-byte output, which it never does")
}

/// Fills an array from the system CSPRNG.
pub(crate) fn random_array<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| Error::Task("the system random number generator failed".into()))?;
    Ok(out)
}

/// The keys a process may use: one to write new backups with, any number more to read older
/// backups written before a rotation.
///
/// ```
/// use ha_dr::{KeyRing, MasterKey};
/// let old = MasterKey::from_bytes([1; 32]);
/// let new = MasterKey::from_bytes([2; 32]);
/// let ring = KeyRing::new(new.clone()).with_reader(old.clone());
/// assert_eq!(ring.writer().id(), new.id());
/// assert!(ring.get(old.id()).is_some());
/// ```
#[derive(Clone, Debug)]
pub struct KeyRing {
    writer: MasterKey,
    readers: Vec<MasterKey>,
}

impl KeyRing {
    /// A ring that writes (and reads) with `writer`.
    pub fn new(writer: MasterKey) -> Self {
        Self {
            writer,
            readers: Vec::new(),
        }
    }

    /// Adds a key for reading only.
    #[must_use]
    pub fn with_reader(mut self, key: MasterKey) -> Self {
        if self.get(key.id()).is_none() {
            self.readers.push(key);
        }
        self
    }

    /// The key new backups are written with.
    pub fn writer(&self) -> &MasterKey {
        &self.writer
    }

    /// The key with id `id`, if the ring holds it.
    pub fn get(&self, id: &KeyId) -> Option<&MasterKey> {
        std::iter::once(&self.writer)
            .chain(&self.readers)
            .find(|k| k.id() == id)
    }

    /// The ids the ring holds, writer first.
    pub fn ids(&self) -> Vec<&KeyId> {
        std::iter::once(&self.writer)
            .chain(&self.readers)
            .map(MasterKey::id)
            .collect()
    }

    /// The key with id `id`, or [`Error::MissingKey`] naming it and `backup_id`.
    pub(crate) fn require(&self, id: &KeyId, backup_id: &str) -> Result<&MasterKey> {
        self.get(id).ok_or_else(|| Error::MissingKey {
            backup_id: backup_id.to_owned(),
            key_id: id.clone(),
            available: self
                .ids()
                .iter()
                .map(|id| id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_text_in_hex_or_base64_gives_the_same_key() {
        let key = MasterKey::from_bytes([7; 32]);
        let hex_text = hex::encode([7u8; 32]);
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(MasterKey::from_text("t", &hex_text).unwrap().id(), key.id());
        assert_eq!(
            MasterKey::from_text("t", &format!(" {b64}\n"))
                .unwrap()
                .id(),
            key.id()
        );
        let err = MasterKey::from_text("in env X", "abcd").unwrap_err();
        assert!(err.to_string().contains("in env X"), "{err}");
        assert_eq!(key.id().as_str().len(), 16);
        assert!(
            !format!("{key:?}").contains("7, 7"),
            "Debug must not show the key"
        );
    }

    #[test]
    fn keygen_writes_0600_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = MasterKey::keygen(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(MasterKey::load(&path).unwrap().id(), key.id());
        let err = MasterKey::keygen(&path).unwrap_err();
        assert!(err.to_string().contains("must not exist"), "{err}");
        assert_eq!(MasterKey::load(&path).unwrap().id(), key.id(), "untouched");
    }

    #[test]
    fn key_bytes_are_wiped_on_drop_and_key_files_of_the_wrong_size_are_refused() {
        fn wipes_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wipes_on_drop::<MasterKey>();
        wipes_on_drop::<Zeroizing<[u8; KEY_LEN]>>();
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        for (len, says) in [
            (31, "this one 31"),
            (33, "more than 32"),
            (4096, "more than 32"),
        ] {
            let path = dir.path().join(format!("k{len}"));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .unwrap();
            file.write_all(&vec![1u8; len]).unwrap();
            let err = MasterKey::load(&path).expect_err("wrong size");
            assert!(err.to_string().contains(says), "{len}: {err}");
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }
    }

    #[test]
    fn a_key_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = MasterKey::keygen(&path).unwrap();
        for mode in [0o640, 0o604, 0o660, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = MasterKey::load(&path).expect_err("a loose key file must be refused");
            assert!(matches!(err, Error::InvalidKey { .. }), "{mode:o}: {err}");
            assert!(err.to_string().contains("chmod 600"), "{err}");
            assert!(err.to_string().contains(&format!("{mode:04o}")), "{err}");
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(
            MasterKey::load(&path).unwrap().id(),
            key.id(),
            "0400 is fine"
        );
    }

    #[test]
    fn missing_key_names_the_wanted_and_the_held_ids() {
        let ring = KeyRing::new(MasterKey::from_bytes([1; 32]));
        let other = MasterKey::from_bytes([2; 32]);
        let err = ring.require(other.id(), "b-1").unwrap_err();
        let text = err.to_string();
        assert!(text.contains(other.id().as_str()), "{text}");
        assert!(text.contains(ring.writer().id().as_str()), "{text}");
        assert!(text.contains("b-1"), "{text}");
    }
}
