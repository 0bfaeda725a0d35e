//! The manifest the replicator keeps on the target: what it wrote there, so that unchanged
//! files are skipped without reading them and target-side corruption can be found.
//!
//! `.ha-sync-manifest.json` in the target root, written atomically (temporary file, fsync,
//! rename, directory fsync) at the end of each run that changed something:
//!
//! ```json
//! {"version":1,"synced_at":{"secs":1700000100,"nanos":0},"entries":{
//!   "etc":{"kind":"dir","mode":493,"mtime":{"secs":1700000000,"nanos":0}},
//!   "etc/app.conf":{"kind":"file","size":12,"mtime":{"secs":1700000000,"nanos":5},
//!                   "mode":420,"sha256":"…64 hex digits…"},
//!   "current":{"kind":"symlink","target":"etc"}}}
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::digest::Sha256;
use super::target::{EntryMeta, Mtime};

/// The format version this code writes and reads.
pub(crate) const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    pub(crate) version: u32,
    /// When the run that wrote it started (wall clock), to tell which recorded mtimes are too
    /// recent to prove a file unchanged.
    pub(crate) synced_at: Mtime,
    pub(crate) entries: BTreeMap<String, ManifestEntry>,
}

impl Default for Manifest {
    fn default() -> Self {
        Self {
            version: VERSION,
            synced_at: Mtime { secs: 0, nanos: 0 },
            entries: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum ManifestEntry {
    File {
        size: u64,
        mtime: Mtime,
        mode: u32,
        sha256: Sha256,
    },
    Dir {
        mode: u32,
        mtime: Mtime,
    },
    Symlink {
        target: String,
    },
}

impl ManifestEntry {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ManifestEntry::File { .. } => "file",
            ManifestEntry::Dir { .. } => "directory",
            ManifestEntry::Symlink { .. } => "symlink",
        }
    }

    /// Whether `meta` on the target still has the size and mtime this file was written with,
    /// so its recorded hash can be trusted without reading it.
    pub(crate) fn same_stat(&self, meta: &EntryMeta) -> bool {
        matches!(
            (self, meta),
            (ManifestEntry::File { size, mtime, .. }, EntryMeta::File { size: s, mtime: m, .. })
                if size == s && mtime == m
        )
    }
}

/// How close to a run's start an mtime may be and still prove nothing: a file written in the
/// same timestamp tick as the run read it can change again without changing size or mtime.
/// Two seconds covers coarse filesystems (FAT) as well as jiffy-grained ones.
const RACY_WINDOW_SECS: i64 = 2;

impl Manifest {
    /// Whether `mtime` is so close to (or after) this manifest's run that a file with it might
    /// have changed after being read without its mtime showing it (git's "racily clean").
    pub(crate) fn is_racy(&self, mtime: Mtime) -> bool {
        mtime.secs.saturating_add(RACY_WINDOW_SECS) >= self.synced_at.secs
    }

    /// Parses a manifest; an error says why in words.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, String> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if manifest.version != VERSION {
            return Err(format!(
                "manifest version {} is not the supported {VERSION}",
                manifest.version
            ));
        }
        Ok(manifest)
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        // Only maps keyed by strings, numbers and strings: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_versions() {
        let mut manifest = Manifest {
            synced_at: Mtime {
                secs: 100,
                nanos: 0,
            },
            ..Manifest::default()
        };
        assert!(manifest.is_racy(Mtime { secs: 98, nanos: 0 }));
        assert!(manifest.is_racy(Mtime {
            secs: 200,
            nanos: 0
        }));
        assert!(!manifest.is_racy(Mtime {
            secs: 97,
            nanos: 999
        }));
        let mtime = Mtime { secs: 5, nanos: 6 };
        manifest.entries.insert(
            "a".into(),
            ManifestEntry::File {
                size: 1,
                mtime,
                mode: 0o644,
                sha256: Sha256::of(b"x"),
            },
        );
        manifest
            .entries
            .insert("d".into(), ManifestEntry::Dir { mode: 0o755, mtime });
        manifest
            .entries
            .insert("l".into(), ManifestEntry::Symlink { target: "a".into() });
        let bytes = manifest.to_bytes();
        assert_eq!(Manifest::parse(&bytes).unwrap(), manifest);
        let text = String::from_utf8(bytes)
            .unwrap()
            .replace("\"version\":1", "\"version\":2");
        assert!(
            Manifest::parse(text.as_bytes())
                .unwrap_err()
                .contains("version 2")
        );
        assert!(Manifest::parse(b"{").is_err());
    }
}
