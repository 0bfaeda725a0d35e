//! Dependency-aware health checks.
//!
//! So far this crate holds the pure, I/O-free core of health checking: state machines and
//! statistics that take `now` as an argument and never read a clock.
//!
//! - [`phi`] — [`PhiAccrualDetector`]: how suspicious is the silence since the last heartbeat.
//! - [`anomaly`] — named [`Rule`]s (latency over p95, EWMA z-score, consecutive failures,
//!   success-rate floor, rising trend) that judge the latest result against a baseline:
//!   statistics, not machine learning.
//! - [`baseline`] — [`Baseline`]: per-check latency percentiles (time window of histograms),
//!   EWMA with variance, success rate and failure streak over the last N results.
//! - [`threshold`] — [`ThresholdState`]: Kubernetes-probe semantics, a status flips only after
//!   N consecutive failures or M consecutive successes.
//!
//! Not built yet (issue 4): the `HealthCheck` trait and built-in checks (Redis, PostgreSQL,
//! TCP, HTTP, command, disk, memory, CPU, closure), the `HealthChecker` that runs them on their
//! own schedules over a dependency DAG, and criticality-aware aggregation into a
//! [`ha_core::Status`].
//!
//! ```
//! use std::time::Duration;
//! use ha_health::{PhiAccrualDetector, PhiConfig, Suspicion};
//! use tokio::time::Instant;
//!
//! let mut peer = PhiAccrualDetector::new(PhiConfig::default())?;
//! let start = Instant::now();
//! for i in 0..5 {
//!     peer.heartbeat(start + Duration::from_secs(i));
//! }
//! let last = start + Duration::from_secs(4);
//! assert_eq!(peer.state(last + Duration::from_millis(900)), Suspicion::Available);
//! assert_eq!(peer.state(last + Duration::from_secs(10)), Suspicion::Failed);
//! # Ok::<(), ha_health::Error>(())
//! ```

pub mod anomaly;
pub mod baseline;
pub mod error;
pub mod phi;
pub mod threshold;

pub use anomaly::{Anomaly, Rule};
pub use baseline::{Baseline, BaselineConfig, Observation};
pub use error::Error;
pub use phi::{PhiAccrualDetector, PhiConfig, Suspicion};
pub use threshold::{Outcome, ThresholdConfig, ThresholdState, Transition};
