//! [`DiskCheck`]: how full the filesystem holding a path is, as `df` reports it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use async_trait::async_trait;
use ha_core::config::Validate;
use nix::sys::statvfs::statvfs;

use super::usage::{self, UsageThresholds};
use crate::{CheckResult, Error, HealthCheck};

/// How full the filesystem holding a path is, from `statvfs(2)`.
///
/// Used percent is computed as `df` computes `Use%`: `used / (used + available)`, with
/// `used = f_blocks − f_bfree` and `available = f_bavail`. Blocks reserved for root count as
/// neither, so 100 % means "full for unprivileged writers" even while root could still write.
/// The free space shown is `f_bavail × f_frsize`.
///
/// Defaults: `Degraded` from 85 %, `Unhealthy` from 90 % ([`Self::DEFAULT_THRESHOLDS`]): disks
/// fill steadily, and 85 % leaves time to act before writes start failing.
///
/// `statvfs` is a blocking system call (and can hang on a dead network filesystem), so it
/// runs on Tokio's blocking pool; the measured latency is that call's duration.
///
/// ```
/// use ha_health::HealthCheck;
/// use ha_health::checks::{DiskCheck, UsageThresholds};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), ha_health::Error> {
/// let check = DiskCheck::new("root-disk", "/").thresholds(UsageThresholds::new(80.0, 95.0))?;
/// let result = check.check().await;
/// println!("{result}"); // e.g. "healthy: / 73.2% used (12.1 GiB free)"
/// assert!(result.detail.starts_with("/ "));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct DiskCheck {
    name: String,
    path: PathBuf,
    thresholds: UsageThresholds,
}

/// One reading of a filesystem.
struct DiskUsage {
    used_percent: f64,
    free_bytes: u64,
}

impl DiskCheck {
    /// `Degraded` from 85 % used, `Unhealthy` from 90 %.
    pub const DEFAULT_THRESHOLDS: UsageThresholds = UsageThresholds::new(85.0, 90.0);

    /// A check of the filesystem holding `path`, with [`Self::DEFAULT_THRESHOLDS`].
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            thresholds: Self::DEFAULT_THRESHOLDS,
        }
    }

    /// Uses `thresholds` instead of the defaults; fails with [`Error::Config`] naming the field
    /// if they are invalid.
    pub fn thresholds(mut self, thresholds: UsageThresholds) -> Result<Self, Error> {
        thresholds
            .validate()
            .map_err(|e| Error::config("disk check", e))?;
        self.thresholds = thresholds;
        Ok(self)
    }

    /// The path whose filesystem is checked.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read(path: &Path) -> Result<DiskUsage, String> {
    let stat = statvfs(path).map_err(|e| format!("statvfs failed: {e}"))?;
    let used = stat.blocks().saturating_sub(stat.blocks_free());
    let available = stat.blocks_available();
    let total = used.saturating_add(available);
    if total == 0 {
        return Err("the filesystem reports no blocks (a pseudo filesystem?)".to_owned());
    }
    Ok(DiskUsage {
        used_percent: used as f64 * 100.0 / total as f64,
        free_bytes: available.saturating_mul(stat.fragment_size()),
    })
}

#[async_trait]
impl HealthCheck for DiskCheck {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> CheckResult {
        let path = self.path.clone();
        let shown = self.path.display();
        let reading = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            read(&path).map(|usage| (usage, started.elapsed()))
        })
        .await;
        let (usage, latency) = match reading {
            Ok(Ok(reading)) => reading,
            Ok(Err(e)) => return CheckResult::unhealthy(format!("{shown}: {e}")),
            Err(e) => return CheckResult::unhealthy(format!("{shown}: statvfs task failed: {e}")),
        };
        let outcome = self.thresholds.outcome(usage.used_percent);
        CheckResult::new(
            outcome,
            format!(
                "{shown} {:.1}% used ({} free){}",
                usage.used_percent,
                usage::bytes(usage.free_bytes),
                self.thresholds.crossed(outcome)
            ),
        )
        .with_latency(latency)
    }
}
