//! Helpers shared by the integration tests: polling with a deadline, checks that a test
//! controls, and an HTTP client.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ha_health::{CheckConfig, CheckResult, FnCheck, HealthCheck};

/// The admin token of every test node (≥ 16 characters).
pub(crate) const TOKEN: &str = "a-token-of-16+chars";

/// Polls `probe` until it returns `Some`, or panics with `what` after `deadline`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A check whose outcome the test sets: healthy while the flag is true.
pub(crate) fn switch_check(name: &str, up: &Arc<AtomicBool>) -> impl HealthCheck + use<> {
    let up = Arc::clone(up);
    FnCheck::new(name, move || {
        let up = up.load(Ordering::SeqCst);
        async move {
            if up {
                CheckResult::healthy("up")
            } else {
                CheckResult::unhealthy("down")
            }
        }
    })
}

/// A check that always passes.
pub(crate) fn ok_check(name: &str) -> impl HealthCheck + use<> {
    FnCheck::new(name, || async { CheckResult::healthy("ok") })
}

/// A fast check config: runs every 50 ms, flips on the first result.
pub(crate) fn fast() -> CheckConfig {
    CheckConfig::default()
        .interval(Duration::from_millis(50))
        .timeout(Duration::from_millis(50))
        .thresholds(1, 1)
}

/// An HTTP client with a short timeout.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}
