//! [`CpuCheck`]: how busy the machine's CPUs have been since the previous run.

use std::time::Instant;

use async_trait::async_trait;
use ha_core::config::Validate;
use sysinfo::{MINIMUM_CPU_UPDATE_INTERVAL, System};
use tokio::sync::Mutex;

use super::usage::UsageThresholds;
use crate::{CheckResult, Error, HealthCheck};

/// How busy the machine's CPUs are, all cores together, from the OS (`/proc/stat` on Linux,
/// through `sysinfo`).
///
/// CPU usage is a rate: it needs two samples. The check keeps one `sysinfo::System` and
/// reports the usage **since its previous run**, so on a 10 s interval it is the average of
/// the last 10 s. When there is no previous sample, or it is younger than
/// [`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`] (200 ms on Linux), the run samples, waits out the
/// rest of that interval (on the Tokio timer) and samples again. The measured latency is the
/// time spent reading, not the wait.
///
/// Defaults: `Degraded` from 80 %, `Unhealthy` from 95 % ([`Self::DEFAULT_THRESHOLDS`]): busy
/// CPUs still serve, so only near-saturation is a failure.
///
/// ```
/// use ha_health::HealthCheck;
/// use ha_health::checks::{CpuCheck, UsageThresholds};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), ha_health::Error> {
/// let check = CpuCheck::new("cpu").thresholds(UsageThresholds::new(90.0, 99.0))?;
/// println!("{}", check.check().await); // e.g. "healthy: cpu 12.5% used"
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct CpuCheck {
    name: String,
    thresholds: UsageThresholds,
    // A Tokio mutex: it is held across the wait between two samples.
    state: Mutex<Samples>,
}

#[derive(Debug, Default)]
struct Samples {
    system: Option<System>,
    /// When `system` last sampled CPU times.
    last: Option<Instant>,
}

impl CpuCheck {
    /// `Degraded` from 80 % busy, `Unhealthy` from 95 %.
    pub const DEFAULT_THRESHOLDS: UsageThresholds = UsageThresholds::new(80.0, 95.0);

    /// A check of the machine's CPUs, with [`Self::DEFAULT_THRESHOLDS`].
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            thresholds: Self::DEFAULT_THRESHOLDS,
            state: Mutex::new(Samples::default()),
        }
    }

    /// Uses `thresholds` instead of the defaults; fails with [`Error::Config`] naming the field
    /// if they are invalid.
    pub fn thresholds(mut self, thresholds: UsageThresholds) -> Result<Self, Error> {
        thresholds
            .validate()
            .map_err(|e| Error::config("cpu check", e))?;
        self.thresholds = thresholds;
        Ok(self)
    }
}

#[async_trait]
impl HealthCheck for CpuCheck {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> CheckResult {
        let mut state = self.state.lock().await;
        let Samples { system, last } = &mut *state;
        let system = match system {
            Some(system) => system,
            None => match System::new() {
                Ok(created) => system.insert(created),
                Err(e) => return CheckResult::unhealthy(format!("cannot read CPU usage: {e}")),
            },
        };
        let mut reading = std::time::Duration::ZERO;
        let since = last.map(|at| at.elapsed());
        if since.is_none_or(|since| since < MINIMUM_CPU_UPDATE_INTERVAL) {
            if since.is_none() {
                let started = Instant::now();
                system.refresh_cpu_usage();
                reading += started.elapsed();
                *last = Some(Instant::now());
            }
            // Cancel-safe: dropped here, the first sample stays and the next run goes on from it.
            let waited = last.map_or(std::time::Duration::ZERO, |at| at.elapsed());
            tokio::time::sleep(MINIMUM_CPU_UPDATE_INTERVAL.saturating_sub(waited)).await;
        }
        let started = Instant::now();
        system.refresh_cpu_usage();
        reading += started.elapsed();
        *last = Some(Instant::now());
        let used_percent = f64::from(system.global_cpu_usage());
        let outcome = self.thresholds.outcome(used_percent);
        CheckResult::new(
            outcome,
            format!(
                "cpu {used_percent:.1}% used{}",
                self.thresholds.crossed(outcome)
            ),
        )
        .with_latency(reading)
    }
}
