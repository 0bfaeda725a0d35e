//! Dependency-aware health checks.
//!
//! This crate will hold the `HealthCheck` trait and built-in checks (Redis, PostgreSQL, TCP,
//! HTTP, command, disk, memory, CPU, closure), the `HealthChecker` that runs them on their own
//! schedules over a dependency DAG, latency baselines, named anomaly rules and a phi-accrual
//! failure detector, and criticality-aware aggregation into a [`ha_core::Status`].
//!
//! Status: not built yet (issue 4). The crate exists so that the workspace layout is final.
