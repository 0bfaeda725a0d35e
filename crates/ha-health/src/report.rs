//! The serializable health report: the overall status, each group's, and per check its
//! status, cause, φ suspicion, latency percentiles and last error.
//!
//! Serialized with `serde_json`, a report looks like this (abridged):
//!
//! ```json
//! { "status": "unhealthy", "node": "n1", "generated_at": "2026-11-23T19:00:00.000Z",
//!   "groups": { "readiness": "unhealthy" },
//!   "checks": [ { "name": "postgres", "status": "unhealthy", "check_status": "unhealthy",
//!                 "cause": "timed out after 1s", "suspicion": "failed", "phi": 21.3,
//!                 "latency_ms": { "p50": 0.8, "p95": 1.9, "p99": 2.4, "ewma": 0.9 }, ... } ] }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use ha_core::{Criticality, Status};
use serde::{Serialize, Serializer};
use tokio::time::Instant;

use crate::baseline::Baseline;
use crate::phi::Suspicion;

/// Everything a [`HealthChecker`](crate::HealthChecker) knows at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// The overall status (see [`rollup`](crate::rollup)).
    pub status: Status,
    /// The node that ran the checks.
    pub node: String,
    /// When the report was made.
    pub generated_at: Timestamp,
    /// Each group's rolled-up status.
    pub groups: BTreeMap<String, Status>,
    /// Every check, dependencies before dependents.
    pub checks: Vec<CheckReport>,
}

/// One check in a [`HealthReport`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct CheckReport {
    /// The check's name.
    pub name: String,
    /// The reported status, dependencies taken into account.
    pub status: Status,
    /// The check's own debounced status, ignoring dependencies.
    pub check_status: Status,
    /// Why the status is not healthy: `dependency X is unhealthy`, or the check's own detail.
    pub cause: Option<String>,
    /// How much the system needs it.
    pub criticality: Criticality,
    /// The groups it belongs to.
    pub groups: Vec<String>,
    /// The checks it depends on.
    pub depends_on: Vec<String>,
    /// The φ-accrual verdict on the silence since the last successful run.
    #[serde(serialize_with = "as_str")]
    pub suspicion: Suspicion,
    /// φ now; `None` before the first successful run.
    pub phi: Option<f64>,
    /// Latency statistics of successful runs, in milliseconds.
    pub latency_ms: LatencySummary,
    /// The share of passed runs in the baseline window.
    pub success_rate: Option<f64>,
    /// Failed runs in a row.
    pub consecutive_failures: u32,
    /// Passed runs in a row.
    pub consecutive_successes: u32,
    /// Runs so far.
    pub runs: u64,
    /// When the last run finished.
    pub last_run: Option<Timestamp>,
    /// The last run's detail.
    pub last_detail: Option<String>,
    /// The detail of the last failed run.
    pub last_error: Option<String>,
}

/// Latency percentiles over the baseline's window and the EWMA, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Exponentially weighted moving average.
    pub ewma: Option<f64>,
}

impl LatencySummary {
    /// The summary of `baseline` at `now`.
    pub fn of(baseline: &Baseline, now: Instant) -> Self {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        Self {
            p50: ms(baseline.p50(now)),
            p95: ms(baseline.p95(now)),
            p99: ms(baseline.p99(now)),
            ewma: ms(baseline.ewma_latency()),
        }
    }
}

/// A wall-clock time, serialized as RFC 3339 UTC with milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Self(t)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_millis(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn as_str<S: Serializer>(suspicion: &Suspicion, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(suspicion.as_str())
}
