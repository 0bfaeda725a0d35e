//! Dependency-aware health checks: probes of real components run on their own schedules,
//! debounced like Kubernetes probes, with root-cause suppression over a dependency DAG,
//! latency baselines, anomaly rules and φ-accrual failure suspicion, rolled up by criticality
//! into an overall status, named groups and a JSON report.
//!
//! ```
//! use std::time::Duration;
//! use ha_core::{Component, ComponentContext, Criticality, HaEvent, Status};
//! use ha_health::{CheckConfig, CheckResult, DiskCheck, FnCheck, HealthChecker};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Who the checker runs as, where it publishes, when it stops: one context for the node.
//! let ctx = ComponentContext::standalone("node-a");
//! let mut events = ctx.bus.subscribe();
//! let every_second = CheckConfig::default().interval(Duration::from_secs(1));
//! let checker = HealthChecker::builder()
//!     .check(FnCheck::new("db", || async { CheckResult::unhealthy("connection refused") }),
//!            every_second.clone().group("readiness"))
//!     .check(FnCheck::new("api", || async { CheckResult::healthy("ok") }),
//!            every_second.clone().depends_on("db").group("readiness").group("liveness"))
//!     .check(DiskCheck::new("disk", "/"),
//!            every_second.criticality(Criticality::Low))
//!     .build()?; // validated, not started
//! checker.start(ctx.clone()).await?; // returns at once: every check is `Unknown` until it runs
//!
//! tokio::time::sleep(Duration::from_millis(2500)).await; // `db` failed three runs in a row
//! assert_eq!(checker.status(), Status::Unhealthy);
//! let report = checker.report();
//! let api = report.checks.iter().find(|c| c.name == "api").unwrap();
//! assert_eq!(api.cause.as_deref(), Some("dependency db is unhealthy")); // the root cause, once
//! assert_eq!(api.check_status, Status::Healthy); // `api` itself answers
//! println!("{}", serde_json::to_string_pretty(&report).unwrap());
//!
//! // Status changes (only changes) are events on the bus.
//! while let Ok(event) = events.try_recv() {
//!     if let HaEvent::HealthChanged { component, from, to, cause, .. } = event {
//!         println!("{component}: {from} -> {to} ({cause:?})");
//!     }
//! }
//! checker.stop().await?; // or `ctx.shutdown.cancel()`
//! # Ok(())
//! # }
//! ```
//!
//! # What is here
//!
//! - [`check`] — the [`HealthCheck`] trait (object safe, cancel-safe, writes nothing) and
//!   [`CheckResult`]; [`checks`] — the built-ins: [`RedisCheck`] (`PING`, `ROLE`),
//!   [`PostgresCheck`] (`SELECT 1`, recovery state, connections vs `max_connections`),
//!   [`TcpCheck`], [`HttpCheck`], [`CommandCheck`], [`DiskCheck`] (statvfs), [`MemoryCheck`]
//!   and [`CpuCheck`] (sysinfo), [`FnCheck`] (a closure).
//! - [`checker`] — [`HealthChecker`]: built unstarted, an [`ha_core::Component`] started
//!   with the node's `ComponentContext` (node, bus, shutdown); a task per check with its own interval and timeout,
//!   missed ticks skipped, a bound on concurrent runs, phases spread over the interval;
//!   publishes `HealthChanged` (transitions only) and `AnomalyDetected`, records `ha_health_*`
//!   metrics. [`config`] — [`CheckConfig`] and [`CheckerConfig`].
//! - [`graph`] — [`DependencyGraph`]: unknown dependencies and cycles refused by name, stable
//!   topological order, root-cause suppression. [`rollup`] — criticality-aware aggregation.
//!   [`report`] — the serializable [`HealthReport`].
//! - [`phi`] — [`PhiAccrualDetector`]: how suspicious is the silence since the last success
//!   (Hayashibara et al., as Akka implements it), reported as [`Suspicion`]: suspected before
//!   failed. [`threshold`] — [`ThresholdState`]: N consecutive failures to go down, M passes
//!   to come back. [`baseline`] — [`Baseline`]: latency percentiles over a sliding window
//!   (hdrhistogram ring), EWMA with variance, success rate. [`anomaly`] — named [`Rule`]s:
//!   statistics, not machine learning.
//!
//! # Features
//!
//! Each built-in check that needs a client library is behind a feature, all on by default:
//! - `redis`: [`RedisCheck`] (fred);
//! - `postgres`: [`PostgresCheck`] (sqlx);
//! - `http`: [`HttpCheck`] (reqwest);
//! - `system`: [`CpuCheck`] and [`MemoryCheck`] (sysinfo).
//!
//! With `--no-default-features` the crate is the checker, the dependency graph, phi,
//! baselines, anomalies, thresholds and the [`TcpCheck`], [`CommandCheck`], [`DiskCheck`]
//! (statvfs) and [`FnCheck`] checks, and compiles no client.
//!
//! The pure parts (phi, threshold, baseline, anomaly, graph, rollup) read no clock: every
//! method takes `now: tokio::time::Instant`, so the checker's logic is tested on paused time.

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
#[cfg(feature = "http")]
pub use checks::HttpCheck;
#[cfg(feature = "postgres")]
pub use checks::PostgresCheck;
pub use checks::{CommandCheck, DiskCheck, FnCheck, TcpCheck, UsageThresholds};
#[cfg(feature = "system")]
pub use checks::{CpuCheck, MemoryCheck};
#[cfg(feature = "redis")]
pub use checks::{RedisCheck, RedisRole};
pub use config::{CheckConfig, CheckerConfig};
pub use error::Error;
pub use graph::DependencyGraph;
pub use phi::{PhiAccrualDetector, PhiConfig, Suspicion};
pub use report::{CheckReport, HealthReport};
pub use threshold::{Outcome, ThresholdConfig, ThresholdState, Transition};
