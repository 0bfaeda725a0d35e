//! Dependency-aware health checks: so far, the pure core — failure detection, debouncing,
//! latency baselines and anomaly rules, all taking `now` as an argument and reading no clock.
//!
//! ```
//! use std::time::Duration;
//! use ha_core::Status;
//! use ha_health::{anomaly, Baseline, BaselineConfig, Observation, Outcome, PhiAccrualDetector,
//!     PhiConfig, Rule, Suspicion, ThresholdConfig, ThresholdState};
//! use tokio::time::Instant;
//!
//! let start = Instant::now();
//! let at = |ms: u64| start + Duration::from_millis(ms);
//!
//! // A peer heartbeats every second; 10 s of silence is a failure.
//! let mut peer = PhiAccrualDetector::new(PhiConfig::default())?;
//! for i in 0..5 {
//!     peer.heartbeat(at(i * 1000));
//! }
//! assert_eq!(peer.state(at(4900)), Suspicion::Available);
//! assert_eq!(peer.state(at(14_000)), Suspicion::Failed);
//!
//! // A check answers in ~10 ms; then one answer takes 90 ms.
//! let mut baseline = Baseline::new(BaselineConfig::default())?;
//! let mut status = ThresholdState::new(ThresholdConfig::default())?;
//! for i in 0..30 {
//!     let ok = Observation::success(Duration::from_millis(10 + i % 3));
//!     baseline.record(at(i * 1000), ok);
//!     status.record(Outcome::Healthy);
//! }
//! let slow = Observation::success(Duration::from_millis(90));
//! let found = anomaly::check(&Rule::defaults(), &baseline, at(30_000), &slow);
//! assert_eq!(found[0].rule, "latency_over_p95");
//! // Slow is an anomaly to report, not a status change.
//! assert_eq!(status.record(Outcome::Healthy), None);
//! assert_eq!(status.status(), Status::Healthy);
//! # Ok::<(), ha_health::Error>(())
//! ```
//!
//! # What is here
//!
//! - [`phi`] — [`PhiAccrualDetector`]: how suspicious is the silence since the last heartbeat
//!   (Hayashibara et al., as Akka implements it), reported as [`Suspicion`].
//! - [`threshold`] — [`ThresholdState`]: Kubernetes-probe semantics; a status flips to
//!   `Unhealthy` only after N consecutive failures, back up only after M consecutive passes.
//! - [`baseline`] — [`Baseline`]: per-check latency percentiles over a time window
//!   (hdrhistogram ring), EWMA with variance for z-scores, success rate and failure streak over
//!   the last N results.
//! - [`anomaly`] — named [`Rule`]s (latency over p95, EWMA z-score, consecutive failures,
//!   success-rate floor, rising trend) that judge the latest result against a baseline:
//!   statistics, not machine learning.
//! - [`Error`] — the crate's one error type.
//!
//! # Not built yet (issue 4)
//!
//! The `HealthCheck` trait and built-in checks (Redis, PostgreSQL, TCP, HTTP, command, disk,
//! memory, CPU, closure), the `HealthChecker` that runs them on their own schedules over a
//! dependency DAG, and criticality-aware aggregation into a [`ha_core::Status`]. They will
//! drive the types above with `tokio::time::Instant`, which is why every `now` here is one.

pub mod anomaly;
pub mod baseline;
pub mod check;
pub mod checker;
pub mod checks;
pub mod config;
pub mod error;
pub mod graph;
pub mod phi;
pub mod report;
pub mod rollup;
pub mod threshold;

pub use anomaly::{Anomaly, Rule};
pub use baseline::{Baseline, BaselineConfig, Observation};
pub use check::{CheckResult, HealthCheck};
pub use checker::{HealthChecker, HealthCheckerBuilder};
pub use checks::{
    CommandCheck, CpuCheck, DiskCheck, FnCheck, HttpCheck, MemoryCheck, PostgresCheck, RedisCheck,
    RedisRole, TcpCheck, UsageThresholds,
};
pub use config::{CheckConfig, CheckerConfig};
pub use error::Error;
pub use graph::DependencyGraph;
pub use phi::{PhiAccrualDetector, PhiConfig, Suspicion};
pub use report::{CheckReport, HealthReport};
pub use threshold::{Outcome, ThresholdConfig, ThresholdState, Transition};
