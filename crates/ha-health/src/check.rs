//! The [`HealthCheck`] trait: one probe of one component, and the [`CheckResult`] it returns.
//!
//! A check only observes. It never writes to what it checks (no test keys in a production
//! Redis), reuses its client between runs (no new connection per check), and reports failure
//! as a result, not a panic. The scheduler owns timing: it runs the check on its interval,
//! cancels it at its timeout (so `check` must be cancel-safe: dropping the future at an
//! `.await` must leave the check usable), debounces the outcome and keeps the baselines.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::threshold::Outcome;

/// One probe of one component.
///
/// Object safe: checks of different kinds live together as `Box<dyn HealthCheck>`.
///
/// Rules every implementation keeps:
/// - `check` writes nothing to the checked component and creates no resources per run
///   (connections come from a client or pool built once);
/// - `check` is cancel-safe: the scheduler drops the future at the check's timeout;
/// - `check` never panics on a failing component: failures are `Outcome::Unhealthy` results
///   with the error in `detail`.
#[async_trait]
pub trait HealthCheck: Send + Sync + 'static {
    /// The check's name, unique within a checker (a metric label and a `depends_on` target).
    fn name(&self) -> &str;

    /// Runs the probe once.
    async fn check(&self) -> CheckResult;
}

/// What one run of a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// Passed, passed with reduced quality, or failed.
    pub outcome: Outcome,
    /// The latency of the probe itself, when the check measured it (e.g. the round trip of
    /// `PING`, without waiting for a pooled connection). `None`: the scheduler uses the wall
    /// time of the whole `check` call.
    pub latency: Option<Duration>,
    /// A short human-readable detail: what was seen (`role=master`) or the error.
    pub detail: String,
}

impl CheckResult {
    /// A passed check.
    pub fn healthy(detail: impl Into<String>) -> Self {
        Self::new(Outcome::Healthy, detail)
    }

    /// A check that passed with reduced quality (e.g. disk 85 % full, past its warning level).
    pub fn degraded(detail: impl Into<String>) -> Self {
        Self::new(Outcome::Degraded, detail)
    }

    /// A failed check; `detail` says why (usually the error).
    pub fn unhealthy(detail: impl Into<String>) -> Self {
        Self::new(Outcome::Unhealthy, detail)
    }

    /// A result with the given outcome.
    pub fn new(outcome: Outcome, detail: impl Into<String>) -> Self {
        Self {
            outcome,
            latency: None,
            detail: detail.into(),
        }
    }

    /// Sets the measured latency of the probe.
    #[must_use]
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = Some(latency);
        self
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = match self.outcome {
            Outcome::Healthy => "healthy",
            Outcome::Degraded => "degraded",
            Outcome::Unhealthy => "unhealthy",
        };
        write!(f, "{outcome}: {}", self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Always(CheckResult);

    #[async_trait]
    impl HealthCheck for Always {
        fn name(&self) -> &str {
            "always"
        }
        async fn check(&self) -> CheckResult {
            self.0.clone()
        }
    }

    #[tokio::test]
    async fn checks_are_object_safe() {
        let checks: Vec<Box<dyn HealthCheck>> = vec![
            Box::new(Always(CheckResult::healthy("ok"))),
            Box::new(Always(
                CheckResult::unhealthy("refused").with_latency(Duration::from_millis(3)),
            )),
        ];
        let mut seen = Vec::new();
        for c in &checks {
            seen.push(c.check().await);
        }
        assert_eq!(seen[0].outcome, Outcome::Healthy);
        assert_eq!(seen[1].latency, Some(Duration::from_millis(3)));
        assert_eq!(seen[1].to_string(), "unhealthy: refused");
    }
}
