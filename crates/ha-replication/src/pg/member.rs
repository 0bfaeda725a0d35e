//! [`PgMember`]: one PostgreSQL server of a replication cluster, with its pooled connection.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use crate::Error;

/// One server (primary or replica) as the monitor and the promoter see it.
///
/// Holds a small lazy pool (at most 2 connections, so a monitor never crowds a server) and
/// puts a timeout on every query. Cheap to clone.
#[derive(Clone)]
pub struct PgMember {
    name: String,
    pool: PgPool,
    options: PgConnectOptions,
    query_timeout: Duration,
    /// Failover priority: among equally advanced replicas the higher one wins; 0 = never.
    priority: u32,
}

impl fmt::Debug for PgMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgMember")
            .field("name", &self.name)
            .field("host", &self.options.get_host())
            .field("port", &self.options.get_port())
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

impl PgMember {
    /// The default limit on each query (2 s).
    pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

    /// A member reached at `url` (`postgres://user@host:port/db`). Connects lazily: an
    /// unreachable server is an error on first use, not here. Must be called inside a Tokio
    /// runtime (the pool starts its upkeep task).
    pub fn new(name: impl Into<String>, url: &str) -> Result<Self, Error> {
        let name = name.into();
        let options: PgConnectOptions = url.parse().map_err(|e| Error::Connect {
            member: name.clone(),
            detail: format!("bad url: {e}"),
        })?;
        let options = options.application_name(&format!("ha-replication/{name}"));
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .min_connections(0)
            .acquire_timeout(Self::DEFAULT_QUERY_TIMEOUT)
            // A server that restarted leaves dead connections behind; test before reuse.
            .test_before_acquire(true)
            .connect_lazy_with(options.clone());
        Ok(Self {
            name,
            pool,
            options,
            query_timeout: Self::DEFAULT_QUERY_TIMEOUT,
            priority: 1,
        })
    }

    /// Sets the limit on each query.
    #[must_use]
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }

    /// Sets the failover priority (default 1); 0 marks the member as never to be promoted
    /// (Patroni's `nofailover`).
    #[must_use]
    pub fn priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }

    /// The member's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The failover priority.
    pub fn failover_priority(&self) -> u32 {
        self.priority
    }

    /// The pool, for queries of your own.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.options.get_port()
    }

    /// The server's host, as the member's URL names it.
    pub fn host(&self) -> &str {
        self.options.get_host()
    }

    /// `host=… port=… user=…` for another server's `primary_conninfo`, with
    /// `application_name` set to `application_name`.
    pub fn conninfo(&self, application_name: &str) -> String {
        format!(
            "host={} port={} user={} application_name={}",
            self.options.get_host(),
            self.options.get_port(),
            self.options.get_username(),
            application_name
        )
    }

    /// Points this replica at another server: `ALTER SYSTEM SET primary_conninfo` (quoted:
    /// `ALTER SYSTEM` takes no parameters) and a reload, which PostgreSQL ≥ 13 applies without
    /// a restart.
    pub(crate) async fn set_primary_conninfo(&self, conninfo: &str) -> Result<(), Error> {
        let alter = format!(
            "ALTER SYSTEM SET primary_conninfo = '{}'",
            conninfo.replace('\'', "''")
        );
        self.run("setting primary_conninfo", |pool| async move {
            sqlx::query(&alter).execute(&pool).await?;
            sqlx::query("SELECT pg_reload_conf()").execute(&pool).await
        })
        .await
        .map(drop)
    }

    /// Runs `query` against the pool under the member's timeout, mapping errors to ones that
    /// name the member and `what` was asked.
    pub(crate) async fn run<T, F>(
        &self,
        what: &'static str,
        query: impl FnOnce(PgPool) -> F,
    ) -> Result<T, Error>
    where
        F: Future<Output = Result<T, sqlx::Error>>,
    {
        self.run_within(what, self.query_timeout, query).await
    }

    /// [`run`](Self::run) with its own limit, for the few slow statements (`pg_promote`).
    pub(crate) async fn run_within<T, F>(
        &self,
        what: &'static str,
        limit: Duration,
        query: impl FnOnce(PgPool) -> F,
    ) -> Result<T, Error>
    where
        F: Future<Output = Result<T, sqlx::Error>>,
    {
        match tokio::time::timeout(limit, query(self.pool.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Error::Query {
                member: self.name.clone(),
                what,
                detail: e.to_string(),
            }),
            Err(_) => Err(Error::Timeout {
                member: self.name.clone(),
                what,
                after: limit,
            }),
        }
    }

    /// Whether the server answers `SELECT 1` on a fresh connection within the query timeout.
    ///
    /// A fresh connection, not the pool: sqlx's pool retries a refused connection until its
    /// acquire timeout, so a server that is down would look merely slow for that long.
    pub async fn is_reachable(&self) -> bool {
        let probe = async {
            let mut conn = PgConnection::connect_with(&self.options).await?;
            sqlx::query("SELECT 1").execute(&mut conn).await?;
            conn.close().await
        };
        matches!(
            tokio::time::timeout(self.query_timeout, probe).await,
            Ok(Ok(()))
        )
    }
}
