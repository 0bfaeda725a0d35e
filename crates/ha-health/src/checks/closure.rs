//! [`FnCheck`]: a check written as an async closure.

use std::fmt;
use std::future::Future;

use async_trait::async_trait;

use crate::{CheckResult, HealthCheck};

/// A check whose probe is an async closure returning a [`CheckResult`]: for whatever the
/// built-in checks do not cover (an application's own invariant, a queue depth).
///
/// The closure is called once per run and must keep the [`HealthCheck`] rules itself: build
/// clients outside it and capture them (cheaply cloned, e.g. in an `Arc`), write nothing, be
/// cancel-safe, and turn errors into [`CheckResult::unhealthy`] rather than panicking.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use ha_health::checks::FnCheck;
/// use ha_health::{CheckResult, HealthCheck};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let queue_depth = Arc::new(AtomicUsize::new(12));
/// let depth = Arc::clone(&queue_depth);
/// let check = FnCheck::new("queue", move || {
///     let depth = depth.load(Ordering::Relaxed);
///     async move {
///         if depth < 1000 {
///             CheckResult::healthy(format!("{depth} queued"))
///         } else {
///             CheckResult::degraded(format!("{depth} queued, backlog"))
///         }
///     }
/// });
/// assert_eq!(check.check().await.detail, "12 queued");
/// # }
/// ```
pub struct FnCheck<F> {
    name: String,
    probe: F,
}

impl<F, Fut> FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CheckResult> + Send + 'static,
{
    /// A check called `name` that runs `probe` on every run.
    pub fn new(name: impl Into<String>, probe: F) -> Self {
        Self {
            name: name.into(),
            probe,
        }
    }
}

impl<F> fmt::Debug for FnCheck<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnCheck")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<F, Fut> HealthCheck for FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CheckResult> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> CheckResult {
        (self.probe)().await
    }
}
