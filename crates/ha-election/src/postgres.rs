//! `PostgresLeaseStore`: leases in a PostgreSQL table, tokens from a sequence, changes pushed
//! with `LISTEN`/`NOTIFY`.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use ha_core::{Backoff, BackoffConfig, ConfigError, FencingToken, NodeId};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Executor, Row};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, oneshot};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::store::{
    Acquire, LeaseChange, LeaseInfo, LeaseRecord, LeaseStore, LeaseWatch, Member, with_timeout,
};

const KIND: &str = "postgres";

/// Capacity of the broadcast channel behind [`LeaseStore::watch`]; a watcher that falls
/// further behind is told it lagged.
const WATCH_CAPACITY: usize = 64;

/// How often an acquire is retried when its statement was refused but found no live holder
/// either: a concurrent grant or release moved the row between our snapshot and our write.
const ACQUIRE_ATTEMPTS: usize = 5;

/// Longest table name: the derived names (`<table>_schema_version`, `<table>_token_seq`) must
/// stay within PostgreSQL's 63-byte identifiers.
const MAX_TABLE_NAME: usize = 63 - "_schema_version".len();

/// Class id of the advisory lock `migrate` takes (the object id is a hash of the table name),
/// so it cannot collide with an application's single-key advisory locks.
const MIGRATE_LOCK_CLASS: i32 = 0x4841_4c45; // "HALE"

/// One versioned schema change, shipped with the crate.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in version order. Append only: a released migration never changes.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "leases",
        sql: include_str!("../migrations/0001_leases.sql"),
    },
    Migration {
        version: 2,
        name: "members",
        sql: include_str!("../migrations/0002_members.sql"),
    },
    Migration {
        version: 3,
        name: "renewals",
        sql: include_str!("../migrations/0003_renewals.sql"),
    },
];

/// Where a [`PostgresLeaseStore`] keeps its leases and how it connects.
///
/// ```
/// use std::time::Duration;
/// use ha_election::PostgresLeaseStoreOptions;
///
/// let options = PostgresLeaseStoreOptions::new()
///     .schema("ha")
///     .table("leases")
///     .acquire_timeout(Duration::from_secs(2));
/// assert_eq!(options.channel_name(), "leases");
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct PostgresLeaseStoreOptions {
    schema: Option<String>,
    table: String,
    channel: Option<String>,
    max_connections: u32,
    acquire_timeout: Duration,
    migrate_timeout: Duration,
    max_lifetime: Duration,
    idle_check_after: Duration,
    allow_async_replication: bool,
}

impl Default for PostgresLeaseStoreOptions {
    fn default() -> Self {
        Self {
            schema: None,
            table: "ha_leases".to_owned(),
            channel: None,
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            migrate_timeout: Duration::from_secs(30),
            max_lifetime: Duration::from_secs(60),
            idle_check_after: Duration::from_secs(10),
            allow_async_replication: false,
        }
    }
}

impl PostgresLeaseStoreOptions {
    /// The defaults: table `ha_leases` on the connection's `search_path`, channel `ha_leases`,
    /// a pool of 4 connections with a 5 s acquire timeout, 30 s for `migrate`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The schema holding the lease table (created by `migrate` if missing). Default: none,
    /// i.e. the first schema of the connection's `search_path`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// The lease table's name (default `ha_leases`). The token sequence is `<table>_token_seq`
    /// and the schema-version table `<table>_schema_version`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The `NOTIFY` channel for lease changes (default: the table's name).
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = Some(channel.into());
        self
    }

    /// The pool size used by [`PostgresLeaseStore::connect_with`] (default 4). The watch
    /// listener, if any, holds one more connection of its own.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max;
        self
    }

    /// How long waiting for a pooled connection (including connecting) may take in the pools
    /// this store builds (default 5 s). Each operation is bounded by its own timeout anyway.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Bound on one [`PostgresLeaseStore::migrate`] run, lock wait included (default 30 s).
    pub fn migrate_timeout(mut self, timeout: Duration) -> Self {
        self.migrate_timeout = timeout;
        self
    }

    /// How long a connection may serve operations before it is closed and replaced
    /// (default 60 s), so a store behind a moved address (a virtual IP, DNS, a proxy) reaches
    /// the new primary within that time even if the old one still accepts writes.
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// A connection unused for this long (default 10 s) is validated before its next
    /// operation with `SELECT pg_is_in_recovery()`: a dead one is replaced, one to a server
    /// now in recovery (a demoted primary) is refused. Busier connections are not pinged, so
    /// an operation stays one round trip.
    pub fn idle_check_after(mut self, idle: Duration) -> Self {
        self.idle_check_after = idle;
        self
    }

    /// Connect even if the server streams to asynchronous replicas only (default: refuse
    /// with [`Error::UnsafeSetting`]). With asynchronous replication a promoted replica may
    /// lack the last grants and renewals: two nodes lead, and a lost grant's token is handed
    /// out again. Allow it only if the lease database never fails over to a replica.
    pub fn allow_async_replication(mut self, allow: bool) -> Self {
        self.allow_async_replication = allow;
        self
    }

    /// The channel lease changes are notified on.
    pub fn channel_name(&self) -> &str {
        self.channel.as_deref().unwrap_or(&self.table)
    }

    /// Checks names (plain identifiers: letters, digits, `_`, not starting with a digit) and
    /// limits, naming the field that broke a rule.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(schema) = &self.schema {
            check_identifier("schema", schema, 63)?;
        }
        check_identifier("table", &self.table, MAX_TABLE_NAME)?;
        let channel = self.channel_name();
        ha_core::config::non_empty("channel", channel)?;
        ha_core::config::ensure(channel.len() <= 63, "channel", || {
            "must be at most 63 bytes".to_owned()
        })?;
        ha_core::config::at_least("max_connections", self.max_connections, 1)?;
        ha_core::config::positive("acquire_timeout", self.acquire_timeout)?;
        ha_core::config::positive("max_lifetime", self.max_lifetime)?;
        ha_core::config::positive("migrate_timeout", self.migrate_timeout)
    }
}

fn check_identifier(field: &str, name: &str, max_len: usize) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    ha_core::config::ensure(plain && name.len() <= max_len, field, || {
        format!(
            "must be 1 to {max_len} ASCII letters, digits or `_`, not starting with a digit \
             (got {name:?})"
        )
    })
}

/// The store's SQL, rendered once with its quoted names.
#[derive(Debug)]
struct Statements {
    /// The schema-qualified lease table name, unquoted, hashed into the migrate lock key.
    lock_name: String,
    create_schema: Option<String>,
    create_versions: String,
    current_version: String,
    record_version: String,
    table: String,
    sequence: String,
    members_table: String,
    acquire: String,
    renew: String,
    release: String,
    read: String,
    heartbeat: String,
    list_members: String,
}

impl Statements {
    fn new(options: &PostgresLeaseStoreOptions) -> Self {
        let qualify = |name: &str| match &options.schema {
            Some(schema) => format!("\"{schema}\".\"{name}\""),
            None => format!("\"{name}\""),
        };
        let table = qualify(&options.table);
        let sequence = qualify(&format!("{}_token_seq", options.table));
        let members = qualify(&format!("{}_members", options.table));
        let versions = qualify(&format!("{}_schema_version", options.table));
        // `nextval` takes the sequence name as text; quoted identifiers cannot contain `'`
        // (validated), so the literal needs no escaping.
        let remaining_ms = "CASE WHEN l.expires_at > now() \
             THEN floor(extract(epoch FROM l.expires_at - now()) * 1000)::bigint ELSE 0 END";
        let record_columns = format!(
            "l.token, l.holder, l.renewals, l.expires_at = '-infinity' AS released, \
             {remaining_ms} AS remaining_ms"
        );
        Self {
            lock_name: match &options.schema {
                Some(schema) => format!("{schema}.{}", options.table),
                None => options.table.clone(),
            },
            create_schema: options
                .schema
                .as_ref()
                .map(|s| format!("CREATE SCHEMA IF NOT EXISTS \"{s}\"")),
            create_versions: format!(
                "CREATE TABLE IF NOT EXISTS {versions} (\
                 version integer PRIMARY KEY, \
                 name text NOT NULL, \
                 applied_at timestamptz NOT NULL DEFAULT now())"
            ),
            current_version: format!("SELECT coalesce(max(version), 0) FROM {versions}"),
            record_version: format!("INSERT INTO {versions} (version, name) VALUES ($1, $2)"),
            // One round trip. With no expected record ($5 false) the insert wins only on a
            // free key; with one, the insert is attempted only if the key has a row, and the
            // conflict update takes it only if the row is exactly the expected record — its
            // expiry is not consulted. The token is the greatest of the sequence's next value,
            // one more than every row's token and the database's clock in microseconds, so
            // tokens keep growing after a sequence reset, a restore or a move to another
            // database. `cur.token < excluded.token` keeps a statement that drew its value
            // early and commits late from lowering a key's token. The notification is sent
            // only for a granted row and only on commit. A refused attempt reports the row
            // from the same statement's snapshot; the caller falls back to a fresh read when
            // that snapshot predates a concurrent change.
            acquire: format!(
                "WITH granted AS (\
                   INSERT INTO {table} AS cur (key, holder, token, renewals, expires_at, acquired_at) \
                   SELECT $1, $2, greatest(nextval('{sequence}'), \
                                           (SELECT coalesce(max(token), 0) + 1 FROM {table}), \
                                           floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint), \
                          0, now() + $3 * interval '1 microsecond', now() \
                    WHERE NOT $5 OR EXISTS (SELECT 1 FROM {table} WHERE key = $1) \
                   ON CONFLICT (key) DO UPDATE \
                     SET holder = excluded.holder, token = excluded.token, renewals = 0, \
                         expires_at = excluded.expires_at, acquired_at = excluded.acquired_at \
                     WHERE $5 AND cur.holder = $6 AND cur.token = $7 AND cur.renewals = $8 \
                       AND (cur.expires_at = '-infinity') = $9 AND cur.token < excluded.token \
                   RETURNING cur.key, cur.token\
                 ) \
                 SELECT true AS granted, g.token, NULL::text AS holder, NULL::bigint AS renewals, \
                        NULL::bool AS released, NULL::bigint AS remaining_ms \
                   FROM granted g CROSS JOIN LATERAL pg_notify($4, g.key) \
                 UNION ALL \
                 SELECT false, {record_columns} \
                   FROM {table} l \
                  WHERE l.key = $1 AND NOT EXISTS (SELECT 1 FROM granted)"
            ),
            // Counts the renewal; never moves `expires_at` backwards (`now()` is sampled
            // before the row lock, so an older renewal may update last).
            renew: format!(
                "UPDATE {table} SET renewals = renewals + 1, \
                        expires_at = greatest(expires_at, now() + $4 * interval '1 microsecond') \
                 WHERE key = $1 AND holder = $2 AND token = $3 AND expires_at > '-infinity'"
            ),
            // The row stays as a tombstone (`expires_at = '-infinity'`): followers take it
            // over at once, and its token keeps bounding the next grant.
            release: format!(
                "WITH released AS (\
                   UPDATE {table} SET expires_at = '-infinity' \
                   WHERE key = $1 AND holder = $2 AND token = $3 AND expires_at > '-infinity' \
                   RETURNING key\
                 ) \
                 SELECT true FROM released r CROSS JOIN LATERAL pg_notify($4, r.key)"
            ),
            read: format!("SELECT {record_columns} FROM {table} l WHERE l.key = $1"),
            // Upserts this node's beat and, in the same statement, drops the group's dead
            // rows (never this node's, which the upsert touches), keeping the table bounded.
            heartbeat: format!(
                "WITH gc AS (\
                   DELETE FROM {members} WHERE grp = $1 AND node <> $2 AND expires_at <= now()\
                 ) \
                 INSERT INTO {members} (grp, node, meta_keys, meta_values, expires_at) \
                 VALUES ($1, $2, $3, $4, now() + $5 * interval '1 microsecond') \
                 ON CONFLICT (grp, node) DO UPDATE \
                   SET meta_keys = excluded.meta_keys, meta_values = excluded.meta_values, \
                       expires_at = excluded.expires_at"
            ),
            list_members: format!(
                "SELECT m.node, m.meta_keys, m.meta_values, \
                        floor(extract(epoch FROM m.expires_at - now()) * 1000)::bigint AS remaining_ms \
                 FROM {members} m WHERE m.grp = $1 AND m.expires_at > now() ORDER BY m.node"
            ),
            table,
            sequence,
            members_table: members,
        }
    }

    fn migration_sql(&self, migration: &Migration) -> String {
        migration
            .sql
            .replace("{{table}}", &self.table)
            .replace("{{sequence}}", &self.sequence)
            .replace("{{members}}", &self.members_table)
    }
}

/// Leases in a PostgreSQL table, fencing tokens from a PostgreSQL sequence.
///
/// How it meets the [`LeaseStore`] rules:
/// - **The store's clock decides nothing.** `expires_at` (from `now()`) only estimates
///   [`LeaseInfo::remaining`]; followers judge expiry on their own clocks and take a row over
///   by compare-and-set on exactly the record they observed (holder, token, `renewals`,
///   released), so a clock step on the database host cannot end a term early. Rows are kept
///   for good. TTLs travel as microseconds.
/// - **Compare-and-set, one statement each.** Acquire is one `INSERT … ON CONFLICT DO UPDATE …
///   WHERE the row is the expected record` (a CTE also returns the refusing row in the same
///   round trip); renew is one `UPDATE … WHERE key, holder, token and not released` that
///   counts the renewal and never moves `expires_at` backwards; release is one CTE that turns
///   the row into a tombstone (`expires_at = '-infinity'`) only for `(holder, token)` and
///   notifies. Row locks serialise concurrent writers; of simultaneous takeovers of one
///   record exactly one wins.
/// - **Tokens.** Each grant takes the greatest of `nextval` of a `CACHE 1` sequence, one more
///   than every row's token, and the database's clock in microseconds — so tokens keep growing
///   after a sequence reset, a restore from backup or a move to another database — and
///   additionally requires the new token to exceed the row's current one, so a statement that
///   drew its value early but committed late cannot lower a key's token. Rows are never
///   deleted, so a row's token bounds the next grant. A granted token is only returned after
///   its row committed — provided commits are durable: [`connect`](Self::connect) sets
///   `synchronous_commit = on` on its connections; with [`from_pool`](Self::from_pool) that
///   is the pool's business. With asynchronous replication, a promoted replica may lack the
///   last grants: [`connect`](Self::connect) finds out the server's [`Durability`] and
///   refuses asynchronous replicas unless
///   [allowed](PostgresLeaseStoreOptions::allow_async_replication), and refuses a standby.
/// - **Connections.** At most `max_connections` serve operations (plus `migrate`'s and the
///   listener's); each lives at most `max_lifetime`, one idle for `idle_check_after` is
///   validated with `SELECT pg_is_in_recovery()` before reuse, and new ones are checked not to
///   be in recovery. Each session's `statement_timeout` is the operation's timeout, so a
///   backend whose client gave up cancels its statement instead of committing later.
/// - **Timeouts.** Every operation runs under [`with_timeout`]; sqlx failures become
///   [`Error::Store`], a row that does not decode becomes [`Error::Corrupt`].
///
/// **Watching.** [`watch`](LeaseStore::watch) returns a receiver fed by one background task
/// per store that `LISTEN`s on the channel; grants and releases `NOTIFY` it with the key as
/// payload (sent on commit). Notifications are not queued for a disconnected listener: while
/// the listener's connection is down, changes are missed. When it reconnects, the task sends
/// one [`LeaseChange`] for every watched key so watchers re-read; followers should still
/// poll at their own pace (a silently partitioned connection is only noticed by TCP). The
/// task ends when the last clone of the store is dropped; its receivers then see `Closed`.
///
/// ```no_run
/// # async fn demo() -> ha_election::Result<()> {
/// use std::time::Duration;
/// use ha_election::{LeaseStore, PostgresLeaseStore};
///
/// let store = PostgresLeaseStore::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
/// let lease = store.read("orders/leader", Duration::from_secs(1)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PostgresLeaseStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    /// `host:port/database`, for errors (no credentials).
    target: String,
    durability: OnceLock<Durability>,
    options: PostgresLeaseStoreOptions,
    sql: Statements,
    connections: Connections,
    watcher: tokio::sync::Mutex<Option<Watcher>>,
}

/// The connections lease operations run on, taken from the pool once and then kept outside
/// its checkout/release cycle: sqlx's pool pings every connection it takes back, which would
/// make every operation two round trips. A connection whose operation did not finish (an
/// error, or a timeout that cancelled it mid-query) is dropped, never reused, so no half-read
/// answer can reach the next operation.
///
/// Bounded in number: every live connection (idle or in use) holds one of `max_connections`
/// permits. Each has a maximum lifetime; one idle for `idle_check_after` is validated (and
/// re-checked not to be in recovery) before reuse.
#[derive(Debug)]
struct Connections {
    idle: Mutex<Vec<Pooled>>,
    permits: Arc<Semaphore>,
}

/// A live connection with what the store tracks about it.
#[derive(Debug)]
struct Pooled {
    conn: PgConnection,
    born: Instant,
    used: Instant,
    /// The session's `statement_timeout` as last set (`None`: the server's default).
    statement_timeout: Option<Duration>,
    _permit: OwnedSemaphorePermit,
}

/// A connection checked out of [`Connections`]; [`finish`](Self::finish) returns it, dropping
/// it closes it.
struct Checkout<'a> {
    pooled: Option<Pooled>,
    home: &'a Connections,
}

impl Checkout<'_> {
    fn conn(&mut self) -> &mut PgConnection {
        &mut self
            .pooled
            .as_mut()
            .unwrap_or_else(|| unreachable!("a checkout holds its connection until finished"))
            .conn
    }

    /// The operation completed: the connection is clean and may serve the next one.
    fn finish(mut self) {
        if let Some(mut pooled) = self.pooled.take() {
            pooled.used = Instant::now();
            self.home
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(pooled);
        }
    }
}

const IN_RECOVERY: &str =
    "the server is in recovery (a standby): lease operations need the primary";

/// How durable a grant is on the lease database, as
/// [`PostgresLeaseStore::check_durability`] found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// No replica streams from the server: a grant is as durable as its disk.
    Single,
    /// At least one standby is synchronous (`sync_state` `sync` or `quorum`): a commit (with
    /// `synchronous_commit = on`) waits for it.
    Synchronous {
        /// Synchronous standbys.
        standbys: u32,
        /// All streaming replicas.
        replicas: u32,
    },
    /// Replicas stream, none synchronously: refused unless allowed.
    Asynchronous {
        /// Streaming replicas.
        replicas: u32,
    },
}

/// The running listener task: dropping `_stop` (with the store) ends it.
#[derive(Debug)]
struct Watcher {
    changes: broadcast::Sender<LeaseChange>,
    watched: Arc<Mutex<HashSet<String>>>,
    _stop: oneshot::Sender<()>,
}

impl PostgresLeaseStore {
    /// Connects with the default [`PostgresLeaseStoreOptions`] and runs
    /// [`migrate`](Self::migrate).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PostgresLeaseStoreOptions::default()).await
    }

    /// Builds a small pool for `url` (size and acquire timeout from `options`, sessions with
    /// `synchronous_commit = on`) and runs [`migrate`](Self::migrate).
    pub async fn connect_with(url: &str, options: PostgresLeaseStoreOptions) -> Result<Self> {
        options.validate()?;
        let connect: PgConnectOptions = url.parse().map_err(|e| store_error("connect", "", e))?;
        let connect = connect
            .options([("synchronous_commit", "on")])
            .application_name("ha-election");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .max_lifetime(options.max_lifetime)
            // For the connections `migrate` takes back to the pool; operations' connections
            // live in the store's own list, validated there after `idle_check_after`.
            .test_before_acquire(true)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
                        .fetch_one(&mut *conn)
                        .await?;
                    if in_recovery {
                        return Err(sqlx::Error::Protocol(IN_RECOVERY.to_owned()));
                    }
                    Ok(())
                })
            })
            .connect_lazy_with(connect);
        let store = Self::from_pool_with(pool, options)?;
        let durability = store.check_durability().await?;
        tracing::info!(store = KIND, target = %store.inner.target, ?durability, "lease store durability");
        store.migrate().await?;
        Ok(store)
    }

    /// Uses an existing pool with the default options. Does not migrate: call
    /// [`migrate`](Self::migrate) once before use (it is idempotent).
    pub fn from_pool(pool: PgPool) -> Self {
        Self::build(pool, PostgresLeaseStoreOptions::default())
    }

    /// Uses an existing pool with `options` (the pool settings in them are ignored). Does not
    /// migrate.
    pub fn from_pool_with(pool: PgPool, options: PostgresLeaseStoreOptions) -> Result<Self> {
        options.validate()?;
        Ok(Self::build(pool, options))
    }

    fn build(pool: PgPool, options: PostgresLeaseStoreOptions) -> Self {
        let sql = Statements::new(&options);
        let target = {
            let connect = pool.connect_options();
            format!(
                "{}:{}/{}",
                connect.get_host(),
                connect.get_port(),
                connect.get_database().unwrap_or("")
            )
        };
        Self {
            inner: Arc::new(Inner {
                pool,
                target,
                durability: OnceLock::new(),
                connections: Connections {
                    idle: Mutex::new(Vec::new()),
                    permits: Arc::new(Semaphore::new(
                        usize::try_from(options.max_connections).unwrap_or(1).max(1),
                    )),
                },
                options,
                sql,
                watcher: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// The pool the store takes its connections from (and migrates through).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The options the store was built with.
    pub fn options(&self) -> &PostgresLeaseStoreOptions {
        &self.inner.options
    }

    /// What [`check_durability`](Self::check_durability) found (run by
    /// [`connect`](Self::connect)); `None` if it has not run.
    pub fn durability(&self) -> Option<Durability> {
        self.inner.durability.get().copied()
    }

    /// Finds out how durable a grant is on this server and refuses what leases cannot live
    /// with: a server in recovery (a standby), and — unless
    /// [`allow_async_replication`](PostgresLeaseStoreOptions::allow_async_replication) —
    /// replicas that all stream asynchronously ([`Error::UnsafeSetting`] on
    /// `synchronous_standby_names`). Reads `pg_stat_replication`: a role that may not see its
    /// `sync_state` (neither superuser nor `pg_read_all_stats`) sees its replicas as
    /// asynchronous. [`connect`](Self::connect) runs it; with [`from_pool`](Self::from_pool),
    /// call it yourself.
    pub async fn check_durability(&self) -> Result<Durability> {
        let key = "";
        // A connection of its own: the pool's refuse a standby and would only time out.
        let options = (*self.inner.pool.connect_options()).clone();
        let mut conn = tokio::time::timeout(
            self.inner.options.acquire_timeout,
            PgConnection::connect_with(&options),
        )
        .await
        .map_err(|_| store_error("connect", key, sqlx::Error::PoolTimedOut))?
        .map_err(|e| store_error("connect", key, e))?;
        let row = sqlx::query(
            "SELECT pg_is_in_recovery() AS in_recovery, \
                    current_setting('synchronous_standby_names') AS standby_names, \
                    (SELECT count(*) FROM pg_stat_replication) AS replicas, \
                    (SELECT count(*) FROM pg_stat_replication \
                      WHERE sync_state IN ('sync', 'quorum')) AS standbys",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(|e| store_error("connect", key, e))?;
        drop(conn);
        if decode::<bool>(&row, "in_recovery", key)? {
            return Err(store_error(
                "connect",
                key,
                sqlx::Error::Protocol(IN_RECOVERY.to_owned()),
            ));
        }
        let count = |column| -> Result<u32> {
            Ok(u32::try_from(decode::<i64>(&row, column, key)?).unwrap_or(u32::MAX))
        };
        let (replicas, standbys) = (count("replicas")?, count("standbys")?);
        let durability = match (replicas, standbys) {
            (0, _) => Durability::Single,
            (_, 0) => Durability::Asynchronous { replicas },
            _ => Durability::Synchronous { standbys, replicas },
        };
        if let Durability::Asynchronous { .. } = durability
            && !self.inner.options.allow_async_replication
        {
            return Err(Error::UnsafeSetting {
                store: KIND,
                target: self.inner.target.clone(),
                setting: "synchronous_standby_names",
                value: decode::<String>(&row, "standby_names", key)?,
                why: "leaves every replica asynchronous: a promoted replica may lack the last \
                      grants and renewals (two leaders) and hand out a lost grant's token \
                      again; make a standby synchronous or allow asynchronous replication",
            });
        }
        let _ = self.inner.durability.set(durability);
        Ok(durability)
    }

    /// Creates (or upgrades) the lease table, the token sequence and the schema-version table.
    ///
    /// Idempotent and safe to run from many nodes at once: it runs in one transaction under a
    /// transaction-scoped advisory lock keyed by the table name, applies only the shipped
    /// migrations newer than the recorded version, and records each. Bounded by the
    /// options' `migrate_timeout`.
    pub async fn migrate(&self) -> Result<()> {
        let sql = &self.inner.sql;
        let table = sql.lock_name.as_str();
        with_timeout(
            KIND,
            "migrate",
            table,
            self.inner.options.migrate_timeout,
            async {
                let err = |e| store_error("migrate", table, e);
                let mut tx = self.inner.pool.begin().await.map_err(err)?;
                // One named `&mut PgConnection` rather than `&mut *tx` per query: the latter makes
                // the future's `Send` depend on a higher-ranked `Executor` bound rustc cannot prove.
                let conn: &mut PgConnection = &mut tx;
                sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
                    .bind(MIGRATE_LOCK_CLASS)
                    .bind(table)
                    .execute(&mut *conn)
                    .await
                    .map_err(err)?;
                if let Some(create_schema) = &sql.create_schema {
                    conn.execute(create_schema.as_str()).await.map_err(err)?;
                }
                conn.execute(sql.create_versions.as_str())
                    .await
                    .map_err(err)?;
                let current: i32 = sqlx::query_scalar(&sql.current_version)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(err)?;
                for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
                    tracing::debug!(
                        store = KIND,
                        table,
                        version = migration.version,
                        name = migration.name,
                        "applying lease store migration"
                    );
                    conn.execute(sql.migration_sql(migration).as_str())
                        .await
                        .map_err(err)?;
                    sqlx::query(&sql.record_version)
                        .bind(migration.version)
                        .bind(migration.name)
                        .execute(&mut *conn)
                        .await
                        .map_err(err)?;
                }
                tx.commit().await.map_err(err)?;
                let latest = MIGRATIONS.last().map_or(0, |m| m.version);
                if current > latest {
                    tracing::warn!(
                        store = KIND,
                        table,
                        current,
                        latest,
                        "lease schema is newer than this build knows; using it as is"
                    );
                }
                tracing::debug!(store = KIND, table, from = current, "lease schema migrated");
                Ok(())
            },
        )
        .await
    }

    /// A connection for one operation: an idle one, or a new one from the pool.
    ///
    /// The session's `statement_timeout` is the operation's `timeout` (set when it differs
    /// from the last one, so once per connection for a steady caller): a backend whose client
    /// gave up cancels its statement instead of committing later.
    async fn checkout(
        &self,
        op: &'static str,
        key: &str,
        timeout: Duration,
    ) -> Result<Checkout<'_>> {
        let home = &self.inner.connections;
        let options = &self.inner.options;
        let mut pooled = loop {
            let idle = home
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let Some(mut pooled) = idle else {
                let permit = Arc::clone(&home.permits)
                    .acquire_owned()
                    .await
                    .map_err(|_| store_error(op, key, sqlx::Error::PoolClosed))?;
                let conn = self
                    .inner
                    .pool
                    .acquire()
                    .await
                    .map_err(|e| store_error(op, key, e))?
                    .detach();
                let now = Instant::now();
                break Pooled {
                    conn,
                    born: now,
                    used: now,
                    statement_timeout: None,
                    _permit: permit,
                };
            };
            if pooled.born.elapsed() >= options.max_lifetime {
                continue;
            }
            if pooled.used.elapsed() >= options.idle_check_after {
                match sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()")
                    .fetch_one(&mut pooled.conn)
                    .await
                {
                    Ok(false) => {}
                    Ok(true) => {
                        return Err(store_error(
                            op,
                            key,
                            sqlx::Error::Protocol(IN_RECOVERY.to_owned()),
                        ));
                    }
                    Err(e) => {
                        tracing::debug!(store = KIND, error = %e, "idle connection failed its check; replaced");
                        continue;
                    }
                }
            }
            break pooled;
        };
        if pooled.statement_timeout != Some(timeout) {
            let ms = timeout.as_nanos().div_ceil(1_000_000).max(1);
            pooled
                .conn
                .execute(format!("SET statement_timeout = {ms}").as_str())
                .await
                .map_err(|e| store_error(op, key, e))?;
            pooled.statement_timeout = Some(timeout);
        }
        Ok(Checkout {
            pooled: Some(pooled),
            home,
        })
    }

    /// The fresh-snapshot read behind `read` and the refused-acquire fallback.
    async fn read_row(
        &self,
        op: &'static str,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<LeaseInfo>> {
        let mut checkout = self.checkout(op, key, timeout).await?;
        let row = sqlx::query(&self.inner.sql.read)
            .bind(key)
            .fetch_optional(checkout.conn())
            .await
            .map_err(|e| store_error(op, key, e))?;
        checkout.finish();
        row.map(|row| lease_info(&row, key)).transpose()
    }

    /// A refused acquire's answer from a fresh read.
    async fn refusal(&self, key: &str, timeout: Duration) -> Result<Acquire> {
        Ok(match self.read_row("acquire", key, timeout).await? {
            Some(info) => Acquire::Held(info),
            None => Acquire::Vacant,
        })
    }

    async fn start_watcher(&self, key: &str) -> Result<Watcher> {
        let listener_pool = listener_pool(&self.inner.pool, &self.inner.options);
        let channel = self.inner.options.channel_name().to_owned();
        let listener = listen(&listener_pool, &channel, key).await?;
        let (changes, _) = broadcast::channel(WATCH_CAPACITY);
        let watched = Arc::new(Mutex::new(HashSet::new()));
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(forward_notifications(
            listener,
            listener_pool,
            channel,
            changes.clone(),
            Arc::clone(&watched),
            stopped,
        ));
        Ok(Watcher {
            changes,
            watched,
            _stop: stop,
        })
    }
}

/// A one-connection pool for the listener, from the store pool's connect options, so the
/// listener neither takes an operation's connection nor connects without a timeout.
fn listener_pool(pool: &PgPool, options: &PostgresLeaseStoreOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(options.acquire_timeout)
        .connect_lazy_with((*pool.connect_options()).clone())
}

async fn listen(pool: &PgPool, channel: &str, key: &str) -> Result<PgListener> {
    let err = |e| store_error("watch", key, e);
    let mut listener = PgListener::connect_with(pool).await.map_err(err)?;
    listener.listen(channel).await.map_err(err)?;
    Ok(listener)
}

/// The watch task: forwards each notification's payload (a key) to the broadcast channel
/// until the store is dropped, re-listening with backoff when the connection fails.
async fn forward_notifications(
    mut listener: PgListener,
    pool: PgPool,
    channel: String,
    changes: broadcast::Sender<LeaseChange>,
    watched: Arc<Mutex<HashSet<String>>>,
    mut stopped: oneshot::Receiver<()>,
) {
    // After a reconnection, changes made while disconnected were missed: tell every watcher
    // of every watched key to re-read.
    let resync = || {
        let keys: Vec<String> = watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        for key in keys {
            let _ = changes.send(LeaseChange { key });
        }
    };
    loop {
        let next = tokio::select! {
            _ = &mut stopped => break,
            next = listener.try_recv() => next,
        };
        match next {
            Ok(Some(notification)) => {
                let key = notification.payload().to_owned();
                tracing::debug!(store = KIND, %key, "lease change notified");
                let _ = changes.send(LeaseChange { key });
            }
            Ok(None) => {
                // sqlx reconnected and re-listened before returning.
                tracing::warn!(
                    store = KIND,
                    %channel,
                    "lease listener reconnected; changes made meanwhile were missed"
                );
                resync();
            }
            Err(error) => {
                tracing::warn!(store = KIND, %channel, %error, "lease listener failed; reconnecting");
                let mut backoff = Backoff::new(BackoffConfig::default());
                listener = loop {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    tokio::select! {
                        _ = &mut stopped => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    match listen(&pool, &channel, "").await {
                        Ok(listener) => break listener,
                        Err(error) => {
                            tracing::debug!(store = KIND, %channel, %error, "lease listener still down");
                        }
                    }
                };
                tracing::info!(store = KIND, %channel, "lease listener reconnected");
                resync();
            }
        }
    }
    tracing::debug!(store = KIND, %channel, "lease listener stopped");
    // Closing the pool closes the listener's connection instead of leaving it to idle out.
    drop(listener);
    pool.close().await;
}

fn store_error(op: &'static str, key: &str, source: sqlx::Error) -> Error {
    Error::Store {
        store: KIND,
        op,
        key: key.to_owned(),
        source: Box::new(source),
    }
}

fn corrupt(key: &str, detail: String) -> Error {
    Error::Corrupt {
        store: KIND,
        key: key.to_owned(),
        detail,
    }
}

fn decode<'r, T>(row: &'r PgRow, column: &str, key: &str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(column)
        .map_err(|e| corrupt(key, format!("column `{column}`: {e}")))
}

fn token(value: i64, key: &str) -> Result<FencingToken> {
    u64::try_from(value)
        .ok()
        .filter(|&t| t > 0)
        .map(FencingToken)
        .ok_or_else(|| corrupt(key, format!("token {value} is not positive")))
}

/// A lease row (the statements' record columns) as a [`LeaseInfo`].
fn lease_info(row: &PgRow, key: &str) -> Result<LeaseInfo> {
    Ok(LeaseInfo {
        holder: NodeId::new(decode::<String>(row, "holder", key)?),
        token: token(decode(row, "token", key)?, key)?,
        renewals: u64::try_from(decode::<i64>(row, "renewals", key)?)
            .map_err(|_| corrupt(key, "negative renewals".to_owned()))?,
        released: decode(row, "released", key)?,
        remaining: remaining(decode(row, "remaining_ms", key)?),
    })
}

fn remaining(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A duration as whole microseconds (PostgreSQL's resolution), rounded up so a tiny TTL is
/// not zero, saturating.
fn micros(d: Duration) -> i64 {
    let rounded = d.as_micros() + u128::from(!d.subsec_nanos().is_multiple_of(1000));
    i64::try_from(rounded).unwrap_or(i64::MAX)
}

#[async_trait]
impl LeaseStore for PostgresLeaseStore {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn acquire(
        &self,
        key: &str,
        holder: &NodeId,
        ttl: Duration,
        expected: Option<&LeaseRecord>,
        timeout: Duration,
    ) -> Result<Acquire> {
        with_timeout(KIND, "acquire", key, timeout, async {
            let sql = &self.inner.sql;
            let expected_token = match expected.map(|e| i64::try_from(e.token.get())) {
                None => None,
                Some(Ok(token)) => Some(token),
                // No token this store issued is that large: the key cannot hold that record.
                Some(Err(_)) => return self.refusal(key, timeout).await,
            };
            for attempt in 1..=ACQUIRE_ATTEMPTS {
                let mut checkout = self.checkout("acquire", key, timeout).await?;
                let row = sqlx::query(&sql.acquire)
                    .bind(key)
                    .bind(holder.as_str())
                    .bind(micros(ttl))
                    .bind(self.inner.options.channel_name())
                    .bind(expected.is_some())
                    .bind(expected.map(|e| e.holder.as_str()))
                    .bind(expected_token)
                    .bind(expected.map(|e| i64::try_from(e.renewals).unwrap_or(i64::MAX)))
                    .bind(expected.map(|e| e.released))
                    .fetch_optional(checkout.conn())
                    .await
                    .map_err(|e| store_error("acquire", key, e))?;
                checkout.finish();
                if let Some(row) = row {
                    if decode::<bool>(&row, "granted", key)? {
                        let tok = token(decode(&row, "token", key)?, key)?;
                        tracing::debug!(store = KIND, key, %holder, token = %tok, "lease acquired");
                        return Ok(Acquire::Acquired(tok));
                    }
                    let info = lease_info(&row, key)?;
                    tracing::debug!(store = KIND, key, %holder, held_by = %info.holder, "lease held");
                    return Ok(Acquire::Held(info));
                }
                // No grant and no row in our snapshot: the key is vacant, or a concurrent
                // statement created the row after our snapshot was taken. Look again with a
                // fresh one; retry only if it shows what we expected after all.
                match self.read_row("acquire", key, timeout).await? {
                    None if expected.is_some() => return Ok(Acquire::Vacant),
                    Some(info) if Some(&info.record()) != expected => {
                        tracing::debug!(store = KIND, key, %holder, held_by = %info.holder, "lease held");
                        return Ok(Acquire::Held(info));
                    }
                    _ => {}
                }
                tracing::debug!(store = KIND, key, %holder, attempt, "acquire raced; retrying");
            }
            Err(Error::Store {
                store: KIND,
                op: "acquire",
                key: key.to_owned(),
                source: format!(
                    "no grant and no refusal in {ACQUIRE_ATTEMPTS} attempts: the row kept \
                     changing"
                )
                .into(),
            })
        })
        .await
    }

    async fn renew(
        &self,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<bool> {
        with_timeout(KIND, "renew", key, timeout, async {
            let Ok(token_value) = i64::try_from(token.get()) else {
                // No token this store issued is that large.
                return Ok(false);
            };
            let mut checkout = self.checkout("renew", key, timeout).await?;
            let done = sqlx::query(&self.inner.sql.renew)
                .bind(key)
                .bind(holder.as_str())
                .bind(token_value)
                .bind(micros(ttl))
                .execute(checkout.conn())
                .await
                .map_err(|e| store_error("renew", key, e))?;
            checkout.finish();
            let renewed = done.rows_affected() == 1;
            tracing::debug!(store = KIND, key, %holder, %token, renewed, "lease renew");
            Ok(renewed)
        })
        .await
    }

    async fn release(
        &self,
        key: &str,
        holder: &NodeId,
        token: FencingToken,
        timeout: Duration,
    ) -> Result<bool> {
        with_timeout(KIND, "release", key, timeout, async {
            let Ok(token_value) = i64::try_from(token.get()) else {
                return Ok(false);
            };
            let mut checkout = self.checkout("release", key, timeout).await?;
            let row = sqlx::query(&self.inner.sql.release)
                .bind(key)
                .bind(holder.as_str())
                .bind(token_value)
                .bind(self.inner.options.channel_name())
                .fetch_optional(checkout.conn())
                .await
                .map_err(|e| store_error("release", key, e))?;
            checkout.finish();
            let released = row.is_some();
            tracing::debug!(store = KIND, key, %holder, %token, released, "lease release");
            Ok(released)
        })
        .await
    }

    async fn read(&self, key: &str, timeout: Duration) -> Result<Option<LeaseInfo>> {
        with_timeout(KIND, "read", key, timeout, async {
            let info = self.read_row("read", key, timeout).await?;
            tracing::debug!(store = KIND, key, holder = ?info.as_ref().map(|i| &i.holder), "lease read");
            Ok(info)
        })
        .await
    }

    async fn heartbeat(
        &self,
        group: &str,
        node: &NodeId,
        meta: &BTreeMap<String, String>,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<()> {
        with_timeout(KIND, "heartbeat", group, timeout, async {
            let (keys, values): (Vec<&str>, Vec<&str>) =
                meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).unzip();
            let mut checkout = self.checkout("heartbeat", group, timeout).await?;
            sqlx::query(&self.inner.sql.heartbeat)
                .bind(group)
                .bind(node.as_str())
                .bind(keys)
                .bind(values)
                .bind(micros(ttl))
                .execute(checkout.conn())
                .await
                .map_err(|e| store_error("heartbeat", group, e))?;
            checkout.finish();
            tracing::debug!(store = KIND, group, %node, "member heartbeat");
            Ok(())
        })
        .await
    }

    async fn members(&self, group: &str, timeout: Duration) -> Result<Vec<Member>> {
        with_timeout(KIND, "members", group, timeout, async {
            let mut checkout = self.checkout("members", group, timeout).await?;
            let rows = sqlx::query(&self.inner.sql.list_members)
                .bind(group)
                .fetch_all(checkout.conn())
                .await
                .map_err(|e| store_error("members", group, e))?;
            checkout.finish();
            rows.iter()
                .map(|row| {
                    let node: String = decode(row, "node", group)?;
                    let keys: Vec<String> = decode(row, "meta_keys", group)?;
                    let values: Vec<String> = decode(row, "meta_values", group)?;
                    if keys.len() != values.len() {
                        return Err(corrupt(
                            group,
                            format!("member {node}: meta keys and values differ in length"),
                        ));
                    }
                    Ok(Member {
                        node: NodeId::new(node),
                        meta: keys.into_iter().zip(values).collect(),
                        remaining: remaining(decode(row, "remaining_ms", group)?),
                    })
                })
                .collect()
        })
        .await
    }

    /// Subscribes to grants and releases on the store's channel (all keys: filter on
    /// [`LeaseChange::key`]). The first call starts the listener and returns once it is
    /// `LISTEN`ing, so every change committed after the call returns is delivered (while the
    /// connection holds; see the type's docs).
    async fn watch(&self, key: &str) -> Result<Option<LeaseWatch>> {
        let timeout = self.inner.options.acquire_timeout;
        with_timeout(KIND, "watch", key, timeout, async {
            let mut slot = self.inner.watcher.lock().await;
            let watcher = match slot.take() {
                Some(watcher) => watcher,
                None => {
                    let watcher = self.start_watcher(key).await?;
                    tracing::debug!(store = KIND, key, "lease listener started");
                    watcher
                }
            };
            watcher
                .watched
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key.to_owned());
            let changes = watcher.changes.subscribe();
            *slot = Some(watcher);
            Ok(Some(changes))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_reject_names_that_would_need_escaping() {
        for bad in [
            "",
            "1abc",
            "a-b",
            "a\"b",
            "a'b",
            &"x".repeat(MAX_TABLE_NAME + 1),
        ] {
            let err = PostgresLeaseStoreOptions::new()
                .table(bad)
                .validate()
                .unwrap_err();
            assert!(err.to_string().contains("table"), "{err}");
        }
        assert!(
            PostgresLeaseStoreOptions::new()
                .schema("bad schema")
                .validate()
                .is_err()
        );
        PostgresLeaseStoreOptions::new()
            .schema("ha_2")
            .table("Leases_x")
            .validate()
            .expect("plain identifiers are fine");
    }

    #[test]
    fn statements_use_quoted_qualified_names() {
        let sql = Statements::new(&PostgresLeaseStoreOptions::new().schema("ha").table("l"));
        assert!(sql.acquire.contains("INSERT INTO \"ha\".\"l\" AS cur"));
        assert!(sql.acquire.contains("nextval('\"ha\".\"l_token_seq\"')"));
        let migration = sql.migration_sql(&MIGRATIONS[0]);
        assert!(!migration.contains("{{"), "{migration}");
        assert!(migration.contains("CREATE TABLE IF NOT EXISTS \"ha\".\"l\""));
    }

    fn assert_send<T: Send>(_: &T) {}

    #[tokio::test]
    async fn futures_are_send_so_callers_can_spawn_them() {
        let connect = PostgresLeaseStore::connect("postgres://nowhere");
        assert_send(&connect);
        let pool = PgPoolOptions::new().connect_lazy_with(PgConnectOptions::new());
        let store = PostgresLeaseStore::from_pool(pool);
        assert_send(&store.migrate());
        assert_send(&store.watch("k"));
    }

    #[test]
    fn ttl_microseconds_round_up_and_saturate() {
        assert_eq!(micros(Duration::from_millis(300)), 300_000);
        assert_eq!(micros(Duration::from_nanos(1)), 1);
        assert_eq!(micros(Duration::MAX), i64::MAX);
    }
}
