//! `FileSyncConfig`: what a file replicator may delete, how hard it checks, how many threads
//! it uses.

use ha_core::config::{self, ConfigError, Validate};
use serde::Deserialize;

use super::digest::DEFAULT_BUFFER_SIZE;

/// Largest `parallelism` accepted.
pub const MAX_PARALLELISM: usize = 64;
/// Smallest `buffer_size` accepted (4 KiB).
pub const MIN_BUFFER_SIZE: usize = 4 * 1024;
/// Largest `buffer_size` accepted (64 MiB).
pub const MAX_BUFFER_SIZE: usize = 64 * 1024 * 1024;

/// Settings of a [`FileReplicator`](super::FileReplicator).
///
/// ```
/// use ha_core::Validate;
/// use ha_replication::files::FileSyncConfig;
///
/// let config: FileSyncConfig =
///     serde_json::from_str(r#"{"name": "uploads", "max_deletions": 500}"#).unwrap();
/// assert!(config.delete);
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileSyncConfig {
    /// Names this replication in logs and in the `sync` label of metrics (default `files`).
    pub name: String,
    /// Remove target entries the source no longer has (default true). Off: the target only
    /// grows, and each run reports what it kept.
    pub delete: bool,
    /// Most target entries (files, links and directories each count one) one run may remove
    /// (default 100). A run that would remove more removes none and reports why: a safety valve
    /// against a source that was emptied, unmounted or pointed at the wrong place. Raise it for
    /// planned large removals, or run with a higher value once.
    pub max_deletions: u64,
    /// Let an empty source empty the target (default false). Off: when the source root has
    /// nothing to sync (no entries, or only refused ones), nothing is deleted, whatever
    /// `max_deletions` says.
    pub allow_empty_source: bool,
    /// Hash every file on both sides each run, like `rsync --checksum` (default false). Off,
    /// a file whose size and mtime match the manifest on both sides is skipped without reading
    /// it, so a bit flip on the target that kept size and mtime is found only by
    /// [`verify_target`](super::FileReplicator::verify_target); on, each run also repairs it.
    pub checksum: bool,
    /// Threads that hash and copy files at once (default 8). Between 1 and 64. More threads
    /// than cores pays: a copy spends most of its time waiting for its fsyncs.
    pub parallelism: usize,
    /// Bytes read at a time when hashing and copying, per worker (default 256 KiB; between
    /// 4 KiB and 64 MiB). Memory use is this times `parallelism`, whatever the file sizes.
    pub buffer_size: usize,
}

impl Default for FileSyncConfig {
    fn default() -> Self {
        Self {
            name: "files".into(),
            delete: true,
            max_deletions: 100,
            allow_empty_source: false,
            checksum: false,
            parallelism: 8,
            buffer_size: DEFAULT_BUFFER_SIZE,
        }
    }
}

impl Validate for FileSyncConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::non_empty("name", &self.name)?;
        config::at_least("parallelism", self.parallelism, 1)?;
        config::ensure(self.parallelism <= MAX_PARALLELISM, "parallelism", || {
            format!(
                "must be at most {MAX_PARALLELISM}, got {}",
                self.parallelism
            )
        })?;
        config::at_least("buffer_size", self.buffer_size, MIN_BUFFER_SIZE)?;
        config::ensure(self.buffer_size <= MAX_BUFFER_SIZE, "buffer_size", || {
            format!(
                "must be at most {MAX_BUFFER_SIZE}, got {}",
                self.buffer_size
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_field() {
        assert!(FileSyncConfig::default().validate().is_ok());
        let bad = FileSyncConfig {
            parallelism: 0,
            ..FileSyncConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "parallelism");
        let bad = FileSyncConfig {
            buffer_size: 100,
            ..FileSyncConfig::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "invalid config: `buffer_size` must be at least 4096, got 100"
        );
        let bad = FileSyncConfig {
            name: " ".into(),
            ..FileSyncConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "name");
        assert!(serde_json::from_str::<FileSyncConfig>(r#"{"max_deletes": 1}"#).is_err());
    }
}
