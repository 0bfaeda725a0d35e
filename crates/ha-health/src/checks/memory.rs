//! [`MemoryCheck`]: how much of the machine's RAM is in use.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use ha_core::config::Validate;
use sysinfo::{MemoryRefreshKind, System};

use super::usage::{self, UsageThresholds};
use crate::{CheckResult, Error, HealthCheck};

/// How much of the machine's RAM is in use, from the OS (`/proc/meminfo` on Linux, through
/// `sysinfo`).
///
/// Used percent is `used / total`, where `used = total − available`: page cache the kernel can
/// drop counts as available, as in `free`'s `available` column. The figures are the whole
/// machine's (or VM's), not a container's cgroup limit.
///
/// Defaults: `Degraded` from 85 %, `Unhealthy` from 95 % ([`Self::DEFAULT_THRESHOLDS`]):
/// Linux uses memory generously, and below 5 % available the OOM killer is near.
///
/// One `sysinfo::System` is kept and refreshed (memory only) on each run; the read is a few
/// microseconds and runs inline. The measured latency is that read.
///
/// ```
/// use ha_health::HealthCheck;
/// use ha_health::checks::MemoryCheck;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let check = MemoryCheck::new("memory");
/// println!("{}", check.check().await); // e.g. "healthy: memory 41.0% used (4.6 GiB available of 7.8 GiB)"
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryCheck {
    name: String,
    thresholds: UsageThresholds,
    // Created on the first run, so a platform sysinfo does not support is an unhealthy result
    // rather than a constructor error.
    system: Mutex<Option<System>>,
}

impl MemoryCheck {
    /// `Degraded` from 85 % used, `Unhealthy` from 95 %.
    pub const DEFAULT_THRESHOLDS: UsageThresholds = UsageThresholds::new(85.0, 95.0);

    /// A check of the machine's memory, with [`Self::DEFAULT_THRESHOLDS`].
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            thresholds: Self::DEFAULT_THRESHOLDS,
            system: Mutex::new(None),
        }
    }

    /// Uses `thresholds` instead of the defaults; fails with [`Error::Config`] naming the field
    /// if they are invalid.
    pub fn thresholds(mut self, thresholds: UsageThresholds) -> Result<Self, Error> {
        thresholds
            .validate()
            .map_err(|e| Error::config("memory check", e))?;
        self.thresholds = thresholds;
        Ok(self)
    }

    /// Total and available bytes, read now.
    fn read(&self) -> Result<(u64, u64), String> {
        // A panic elsewhere while holding the lock cannot leave a `System` half-refreshed in a
        // way that matters: the next refresh overwrites it.
        let mut guard = self.system.lock().unwrap_or_else(PoisonError::into_inner);
        let system = match guard.as_mut() {
            Some(system) => system,
            None => {
                guard.insert(System::new().map_err(|e| format!("cannot read memory usage: {e}"))?)
            }
        };
        system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        Ok((system.total_memory(), system.available_memory()))
    }
}

#[async_trait]
impl HealthCheck for MemoryCheck {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> CheckResult {
        let started = Instant::now();
        let (total, available) = match self.read() {
            Ok(reading) => reading,
            Err(e) => return CheckResult::unhealthy(e),
        };
        let latency = started.elapsed();
        if total == 0 {
            return CheckResult::unhealthy("the OS reports 0 bytes of memory");
        }
        let used_percent = total.saturating_sub(available) as f64 * 100.0 / total as f64;
        let outcome = self.thresholds.outcome(used_percent);
        CheckResult::new(
            outcome,
            format!(
                "memory {used_percent:.1}% used ({} available of {}){}",
                usage::bytes(available),
                usage::bytes(total),
                self.thresholds.crossed(outcome)
            ),
        )
        .with_latency(latency)
    }
}
