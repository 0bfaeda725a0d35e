//! [`HttpCheck`]: whether an HTTP endpoint answers `GET` with an expected status.

use std::error::Error as StdError;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ha_core::ConfigError;
use reqwest::{Client, Url};

use crate::{CheckResult, Error, HealthCheck};

/// Bytes of a response body read (and thrown away) so the connection can be reused; a longer
/// body is not read further and its connection is closed instead.
const BODY_CAP: usize = 64 * 1024;

/// Whether `GET <url>` answers with a status in the expected range (default `200..=299`).
///
/// One `reqwest::Client` is built with the check and reused, so its pooled connection is kept
/// between runs (HTTP/1.1 keep-alive). The body is read up to 64 KiB and discarded, never
/// parsed. Plain `http://` only: the client is built without TLS (these checks probe services
/// inside the cluster), and without proxies — environment variables such as `HTTP_PROXY` are
/// ignored, because a health check must reach the service itself. Redirects are followed (up
/// to 10), as reqwest does by default; the status judged is the final one.
///
/// The measured latency is the time until the response headers arrived.
///
/// ```
/// use std::time::Duration;
/// use ha_health::checks::HttpCheck;
///
/// let check = HttpCheck::new("api", "http://127.0.0.1:8080/healthz")?
///     .expect_status(200..=204)?
///     .timeout(Duration::from_secs(2));
/// assert!(HttpCheck::new("tls", "https://example.com/").is_err()); // no TLS in this build
/// # Ok::<(), ha_health::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct HttpCheck {
    name: String,
    url: Url,
    client: Client,
    expected: RangeInclusive<u16>,
    timeout: Option<Duration>,
}

fn config_error(field: &str, rule: String) -> Error {
    Error::config("http check", ConfigError::new(field, rule))
}

impl HttpCheck {
    /// A check of `url` (`http://host[:port]/path`). Fails with [`Error::Config`] on field `url`
    /// if it does not parse or is not `http`.
    pub fn new(name: impl Into<String>, url: &str) -> Result<Self, Error> {
        let url = Url::parse(url).map_err(|e| config_error("url", format!("is not a URL: {e}")))?;
        if url.scheme() != "http" {
            let rule = format!("must be an http:// URL (no TLS support), got {url}");
            return Err(config_error("url", rule));
        }
        let client = ha_clients::http::builder().build().map_err(|e| {
            config_error("url", format!("cannot build an HTTP client: {}", chain(&e)))
        })?;
        Ok(Self {
            name: name.into(),
            url,
            client,
            expected: 200..=299,
            timeout: None,
        })
    }

    /// Statuses that count as healthy, e.g. `200..=204`; fails with [`Error::Config`] on field
    /// `expected_status` unless the range is non-empty and within `100..=599`.
    pub fn expect_status(mut self, expected: RangeInclusive<u16>) -> Result<Self, Error> {
        let valid = !expected.is_empty() && *expected.start() >= 100 && *expected.end() <= 599;
        if !valid {
            let rule = format!("must be a non-empty range within 100..=599, got {expected:?}");
            return Err(config_error("expected_status", rule));
        }
        self.expected = expected;
        Ok(self)
    }

    /// Bounds each request (connect, headers and body). Without it, only the scheduler's
    /// timeout bounds a run.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The URL checked.
    pub fn url(&self) -> &Url {
        &self.url
    }
}

/// An error with its sources, `a: b: c`: reqwest's own message ("error sending request")
/// says little without the cause ("Connection refused").
fn chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[async_trait]
impl HealthCheck for HttpCheck {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> CheckResult {
        let mut request = self.client.get(self.url.clone());
        if let Some(timeout) = self.timeout {
            request = request.timeout(timeout);
        }
        let started = Instant::now();
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(e) => return CheckResult::unhealthy(format!("GET {}: {}", self.url, chain(&e))),
        };
        let latency = started.elapsed();
        let status = response.status();
        let mut read = 0;
        while read <= BODY_CAP {
            match response.chunk().await {
                Ok(Some(chunk)) => read += chunk.len(),
                // A body cut short says nothing about the status already received.
                Ok(None) | Err(_) => break,
            }
        }
        let detail = format!("HTTP {status}");
        let result = if self.expected.contains(&status.as_u16()) {
            CheckResult::healthy(detail)
        } else {
            let (lo, hi) = (self.expected.start(), self.expected.end());
            CheckResult::unhealthy(format!("{detail}, expected {lo}-{hi}"))
        };
        result.with_latency(latency)
    }
}
