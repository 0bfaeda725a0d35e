//! Circuit breakers and automated failover.
//!
//! This crate will hold the `CircuitBreaker` (consecutive-failure, failure-rate and slow-call
//! thresholds, exact half-open probe accounting, a `tower::Layer`) and the `FailoverManager`
//! (thresholds, dependency-ordered actions, bounded concurrency with a waiting queue, cooldown,
//! rollback, verification and a bounded audit history), which acts only while a
//! [`ha_core::LeadershipGate`] says this node leads.
//!
//! Status: not built yet (issue 7). The crate exists so that the workspace layout is final.
