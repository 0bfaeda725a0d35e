//! [`PostgresCheck`]: is a PostgreSQL server up, primary or replica, and how full of
//! connections.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use ha_core::ConfigError;
use ha_core::config;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::threshold::Outcome;
use crate::{CheckResult, Error, HealthCheck};

/// Bounds getting a connection from a pool built by [`PostgresCheck::connect`] (which
/// includes connecting, and retrying a refused connection until then).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// The recovery state a [`PostgresCheck`] can require.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    Primary,
    Replica,
}

/// Three read-only queries on one pooled connection: `SELECT 1` (its round trip is the
/// measured latency), then `pg_is_in_recovery()` and the number of client connections against
/// `max_connections`.
///
/// Results:
/// - `Healthy` with e.g. `primary, 7/100 connections` or `replica, 3/100 connections`;
/// - `Degraded` when connections reach
///   [`degraded_at_connections_percent`](Self::degraded_at_connections_percent) of
///   `max_connections` (default 90 %): new clients are about to be refused;
/// - `Unhealthy` if no connection can be had or a query fails, or if
///   [`expect_primary`](Self::expect_primary) / [`expect_replica`](Self::expect_replica) was
///   set and the recovery state differs.
///
/// Connections counted are `pg_stat_activity` rows with `backend_type = 'client backend'`:
/// background workers, autovacuum and WAL senders have slots of their own and do not use up
/// `max_connections`. Superuser-reserved slots are not subtracted.
///
/// ```no_run
/// use ha_health::HealthCheck;
/// use ha_health::checks::PostgresCheck;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), ha_health::Error> {
/// let check = PostgresCheck::connect("db", "postgres://monitor@10.0.0.5/postgres")
///     .await?
///     .expect_primary()
///     .degraded_at_connections_percent(80.0)?;
/// println!("{}", check.check().await); // "healthy: primary, 7/100 connections"
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresCheck {
    name: String,
    pool: PgPool,
    expected: Option<Expected>,
    degraded_at_percent: f64,
}

impl PostgresCheck {
    /// A check using `pool`, which the application may share. A pool with a bounded
    /// `acquire_timeout` makes a dead server fail the check quickly; sqlx's default is 30 s.
    pub fn new(name: impl Into<String>, pool: PgPool) -> Self {
        Self {
            name: name.into(),
            pool,
            expected: None,
            degraded_at_percent: 90.0,
        }
    }

    /// A check with its own lazy pool for `url` (`postgres://user[:password]@host[:port]/db`):
    /// at most 2 connections, none opened before the first run, at most 3 s to get one.
    /// Unless the URL sets `application_name`, connections are named `ha-health/<name>` so
    /// they are easy to find in `pg_stat_activity`.
    ///
    /// Fails with [`Error::Config`] (field `url`) only if the URL does not parse: a server that
    /// is down makes runs `Unhealthy` until it is up. Call it inside a Tokio runtime (the
    /// pool's maintenance task is spawned on it).
    pub async fn connect(name: impl Into<String>, url: &str) -> Result<Self, Error> {
        let name = name.into();
        let url_error =
            |rule: String| Error::config("postgres check", ConfigError::new("url", rule));
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(url_error(
                "must start with postgres:// or postgresql://".to_owned(),
            ));
        }
        let mut options: PgConnectOptions = url
            .parse()
            .map_err(|e| url_error(format!("is not a PostgreSQL URL: {e}")))?;
        if options.get_application_name().is_none() {
            options = options.application_name(&format!("ha-health/{name}"));
        }
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .min_connections(0)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        Ok(Self::new(name, pool))
    }

    /// Makes a run `Unhealthy` while the server is in recovery (a replica).
    #[must_use]
    pub fn expect_primary(mut self) -> Self {
        self.expected = Some(Expected::Primary);
        self
    }

    /// Makes a run `Unhealthy` unless the server is in recovery (a replica).
    #[must_use]
    pub fn expect_replica(mut self) -> Self {
        self.expected = Some(Expected::Replica);
        self
    }

    /// Connection usage (percent of `max_connections`) from which a run is `Degraded`
    /// (default 90). Fails with [`Error::Config`] on field `degraded_at_connections_percent`
    /// unless `0 < percent ≤ 100`.
    pub fn degraded_at_connections_percent(mut self, percent: f64) -> Result<Self, Error> {
        config::ensure(
            percent.is_finite() && percent > 0.0 && percent <= 100.0,
            "degraded_at_connections_percent",
            || format!("must be in (0, 100], got {percent}"),
        )
        .map_err(|e| Error::config("postgres check", e))?;
        self.degraded_at_percent = percent;
        Ok(self)
    }

    /// The pool the check uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn probe(&self) -> Result<(Duration, bool, i64, i32), String> {
        let mut conn = self.pool.acquire().await.map_err(|e| match e {
            // sqlx keeps retrying a refused connection until the deadline and then reports
            // only the timeout.
            sqlx::Error::PoolTimedOut => format!(
                "no connection within {:?} (server down or unreachable, or the pool exhausted)",
                self.pool.options().get_acquire_timeout()
            ),
            e => format!("cannot get a connection: {e}"),
        })?;
        let started = Instant::now();
        sqlx::query("SELECT 1")
            .execute(&mut *conn)
            .await
            .map_err(|e| format!("SELECT 1 failed: {e}"))?;
        let latency = started.elapsed();
        let (in_recovery, used, max): (bool, i64, i32) = sqlx::query_as(
            "SELECT pg_is_in_recovery(), \
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'), \
                    current_setting('max_connections')::int",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| format!("status query failed: {e}"))?;
        Ok((latency, in_recovery, used, max))
    }
}

#[async_trait]
impl HealthCheck for PostgresCheck {
    fn name(&self) -> &str {
        &self.name
    }

    async fn check(&self) -> CheckResult {
        let (latency, in_recovery, used, max) = match self.probe().await {
            Ok(found) => found,
            Err(e) => return CheckResult::unhealthy(e),
        };
        let role = if in_recovery { "replica" } else { "primary" };
        let mut detail = format!("{role}, {used}/{max} connections");
        let percent = used as f64 * 100.0 / f64::from(max.max(1));
        let expected = match self.expected {
            Some(Expected::Primary) if in_recovery => Some("primary"),
            Some(Expected::Replica) if !in_recovery => Some("replica"),
            _ => None,
        };
        let outcome = if let Some(expected) = expected {
            detail.push_str(&format!(", expected {expected}"));
            Outcome::Unhealthy
        } else if percent >= self.degraded_at_percent {
            detail.push_str(&format!(
                " ({percent:.0}%, degraded at {}%)",
                self.degraded_at_percent
            ));
            Outcome::Degraded
        } else {
            Outcome::Healthy
        };
        CheckResult::new(outcome, detail).with_latency(latency)
    }
}
