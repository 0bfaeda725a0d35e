//! Real PostgreSQL primaries and streaming replicas on free ports, and the `Lsn` type.
//!
//! Each [`PostgresServer`] owns a temporary directory holding its data directory, its unix
//! socket and its log. The child held by [`ServerProcess`] is the postmaster itself (started as
//! `postgres -D <data>`, not through `pg_ctl`), so stopping and reaping it is stopping the
//! server. PostgreSQL moves every child into its own session (`setsid()`), out of the
//! postmaster's process group, so [`pause`](PostgresServer::pause) and
//! [`kill`](PostgresServer::kill) also signal the postmaster's descendants one by one.
//!
//! Durability is left as in production (`fsync = on`, `synchronous_commit = on`): the crash
//! tests built on this module prove that committed data survives a SIGKILL, which they could
//! not do if commits were acknowledged before their WAL left shared memory.
//!
//! PostgreSQL refuses to run as root. When the test process is root, `initdb`, `postgres` and
//! `pg_basebackup` run as the `postgres` OS user and the temporary directory is handed to it.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};
use sqlx::{Connection, Postgres};
use tempfile::TempDir;

use crate::binaries;
use crate::error::{Result, TestkitError};
use crate::process::{ServerProcess, free_port, run_to_completion};

/// How long a server may take from spawn to answering queries, unless the builder says
/// otherwise. Crash recovery after a kill is included in this budget on restart.
const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on establishing one connection: a paused server accepts TCP but never answers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on each probe connection while waiting for start-up, so a slow attempt does not eat
/// the whole start-up budget.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on every helper query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// `pg_promote(true, 30)` waits up to 30 s on the server; give it a little more here.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(40);
/// Bound on dropping a replica's slot on its primary from `Drop`.
const SLOT_DROP_TIMEOUT: Duration = Duration::from_secs(5);
/// How many fresh ports to try when the chosen one was taken before the postmaster bound it.
const PORT_ATTEMPTS: usize = 5;
/// Log lines returned by [`PostgresServer::log_tail`].
const LOG_TAIL_LINES: usize = 50;

/// Makes slot names unique within this test process; the pid makes them unique across
/// processes sharing nothing but the machine.
static SLOT_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A PostgreSQL write-ahead-log position, printed by PostgreSQL as `X/Y` (two hex numbers: the
/// high and low 32 bits).
///
/// ```
/// use ha_testkit::Lsn;
/// let lsn: Lsn = "16/B374D848".parse().unwrap();
/// assert_eq!(lsn, Lsn(0x16_B374_D848));
/// assert_eq!(lsn.to_string(), "16/B374D848");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Why a string is not an [`Lsn`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {input:?}: expected two hex numbers of at most 8 digits as `X/Y`")]
pub struct ParseLsnError {
    input: String,
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError {
            input: s.to_owned(),
        };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        // `u32::from_str_radix` accepts a leading `+`, which PostgreSQL never prints.
        let half = |part: &str| {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(part, 16).map_err(|_| err())
        };
        Ok(Lsn((u64::from(half(hi)?) << 32) | u64::from(half(lo)?)))
    }
}

/// The OS user the PostgreSQL processes run as, when it is not the test process's own.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

impl RunAs {
    /// `Some(postgres user)` when we are root (PostgreSQL refuses to run as root), else `None`.
    fn detect() -> Result<Option<Self>> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let user = nix::unistd::User::from_name("postgres")
            .map_err(|e| TestkitError::io("look up the `postgres` OS user", e.into()))?
            .ok_or_else(|| {
                TestkitError::io(
                    "the tests run as root, and PostgreSQL refuses to; no `postgres` OS user \
                     exists to run it as (installing the `postgresql` package creates it, or: \
                     useradd --system postgres)",
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                )
            })?;
        Ok(Some(Self {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }))
    }

    fn chown_tree(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .map_err(|e| TestkitError::file(path, e))?;
        if std::fs::symlink_metadata(path)
            .map_err(|e| TestkitError::file(path, e))?
            .is_dir()
        {
            for entry in std::fs::read_dir(path).map_err(|e| TestkitError::file(path, e))? {
                let entry = entry.map_err(|e| TestkitError::file(path, e))?;
                self.chown_tree(&entry.path())?;
            }
        }
        Ok(())
    }
}

/// Builds a [`PostgresServer`] primary with extra settings.
///
/// ```no_run
/// # async fn demo() -> ha_testkit::Result<()> {
/// let pg = ha_testkit::PostgresServer::builder()
///     .setting("max_connections", "50")
///     .start()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct PostgresServerBuilder {
    settings: Vec<(String, String)>,
    startup_timeout: Duration,
    fake_clock: bool,
    replication_users: Vec<String>,
}

impl Default for PostgresServerBuilder {
    fn default() -> Self {
        Self {
            settings: Vec::new(),
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            fake_clock: false,
            replication_users: Vec::new(),
        }
    }
}

impl PostgresServerBuilder {
    /// Adds `key = 'value'` to `postgresql.conf`, after the testkit's own lines, so it wins
    /// over them. The value is quoted for you; replicas inherit it through the base backup.
    pub fn setting(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((key.into(), value.into()));
        self
    }

    /// How long start-up (and later restarts, including crash recovery) may take.
    /// Default 30 s.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Runs the postmaster (and every backend it forks) under Debian's `libfaketime`, so that
    /// [`PostgresServer::step_clock`] can move the server's wall clock (`now()`,
    /// `clock_timestamp()`) while it runs — an NTP step on the database host. The monotonic
    /// clock is left alone, as a real step leaves it. The offset starts at zero and survives
    /// restarts. A missing `libfaketime` fails the start with the package to install.
    pub fn fake_clock(mut self) -> Self {
        self.fake_clock = true;
        self
    }

    /// Archives WAL: `archive_mode = on` and `archive_command = command` (PostgreSQL
    /// substitutes `%p` and `%f`; the command runs as the server's OS user, in the data
    /// directory). `wal_level = replica` is the testkit's default already.
    pub fn archive_command(self, command: impl Into<String>) -> Self {
        self.setting("archive_mode", "on")
            .setting("archive_command", command)
    }

    /// `archive_timeout`: a segment with any WAL in it is switched (and so archived) at
    /// least this often. Whole seconds, at least 1.
    pub fn archive_timeout(self, timeout: Duration) -> Self {
        let secs = timeout.as_secs().max(1);
        self.setting("archive_timeout", format!("{secs}s"))
    }

    /// Creates a login role `name` with the `REPLICATION` attribute (not a superuser) once
    /// the server runs: what `pg_basebackup` and streaming need, nothing more. Trust
    /// authentication on loopback, like the `postgres` role.
    pub fn replication_user(mut self, name: impl Into<String>) -> Self {
        self.replication_users.push(name.into());
        self
    }

    /// Runs `initdb`, starts the postmaster on a free port and waits until it answers
    /// `SELECT 1` over TCP.
    pub async fn start(self) -> Result<PostgresServer> {
        let bin_dir = binaries::postgres_bin_dir()?;
        let run_as = RunAs::detect()?;
        let dir = tempfile::Builder::new()
            .prefix("ha-testkit-pg-")
            .tempdir()
            .map_err(|e| TestkitError::io("create a temporary directory for PostgreSQL", e))?;
        if let Some(run_as) = run_as {
            run_as.chown_tree(dir.path())?;
        }
        let data_dir = dir.path().join("data");
        let clock = self.clock_in(dir.path())?;

        let mut initdb = pg_command(&bin_dir, "initdb", run_as, dir.path());
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        run_blocking(initdb).await?;

        let mut conf = String::from(
            "\n# ha-testkit\n\
             listen_addresses = '127.0.0.1'\n\
             wal_level = replica\n\
             max_wal_senders = 10\n\
             max_replication_slots = 10\n\
             hot_standby = on\n\
             fsync = on\n\
             synchronous_commit = on\n\
             shared_buffers = '16MB'\n\
             logging_collector = off\n",
        );
        for (key, value) in &self.settings {
            conf.push_str(&format!("{key} = '{}'\n", value.replace('\'', "''")));
        }
        append(&data_dir.join("postgresql.conf"), &conf)?;
        // Trust is fine: the server listens on loopback only and lives for one test.
        append(
            &data_dir.join("pg_hba.conf"),
            "\n# ha-testkit\n\
             local all all trust\n\
             local replication all trust\n\
             host all all 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n",
        )?;

        let server = PostgresServer::launch(Launch {
            name: "postgres",
            bin_dir,
            run_as,
            dir,
            data_dir,
            startup_timeout: self.startup_timeout,
            replica_of: None,
            clock,
        })
        .await?;
        for user in &self.replication_users {
            server
                .execute(&format!(
                    "CREATE ROLE \"{}\" WITH LOGIN REPLICATION",
                    user.replace('"', "\"\"")
                ))
                .await?;
        }
        Ok(server)
    }

    /// Starts a postmaster on an existing data directory, e.g. one a restore wrote: the
    /// directory is moved into the server's own temporary directory (so it must be on the
    /// same file system as the system temp dir), handed to the server's OS user, and
    /// removed with the server. Ready once it answers `SELECT 1`; a server that is still
    /// recovering answers once it is consistent (`hot_standby = on`), and one whose
    /// recovery fails exits, which is an error here carrying its log.
    pub async fn start_on(self, data_dir: &Path) -> Result<PostgresServer> {
        let bin_dir = binaries::postgres_bin_dir()?;
        let run_as = RunAs::detect()?;
        let dir = tempfile::Builder::new()
            .prefix("ha-testkit-pg-restored-")
            .tempdir()
            .map_err(|e| TestkitError::io("create a temporary directory for PostgreSQL", e))?;
        let target = dir.path().join("data");
        std::fs::rename(data_dir, &target).map_err(|e| {
            TestkitError::io(
                "move the data directory into the server's temporary directory (both must be \
                 on one file system)",
                e,
            )
        })?;
        if let Some(run_as) = run_as {
            run_as.chown_tree(dir.path())?;
        }
        let clock = self.clock_in(dir.path())?;
        PostgresServer::launch(Launch {
            name: "postgres-restored",
            bin_dir,
            run_as,
            dir,
            data_dir: target,
            startup_timeout: self.startup_timeout,
            replica_of: None,
            clock,
        })
        .await
    }

    /// The fake clock's offset file in `dir` (at zero), when [`fake_clock`](Self::fake_clock)
    /// asked for one.
    fn clock_in(&self, dir: &Path) -> Result<Option<FakeClock>> {
        if !self.fake_clock {
            return Ok(None);
        }
        let clock = FakeClock {
            library: binaries::libfaketime()?,
            file: dir.join("faketime"),
        };
        clock.set(0)?;
        Ok(Some(clock))
    }
}

/// Makes `path` (and everything under it) belong to the OS user the testkit's PostgreSQL
/// runs as, when that is not the test process's own user (the tests run as root): a
/// directory an `archive_command` or `restore_command` writes or reads must be theirs.
/// A no-op when the tests do not run as root.
pub fn hand_to_server_user(path: &Path) -> Result<()> {
    match RunAs::detect()? {
        Some(run_as) => run_as.chown_tree(path),
        None => Ok(()),
    }
}

/// Makes `command` run as the OS user the testkit's PostgreSQL runs as (when the tests run
/// as root), so that the files it writes are the server's, as if the server had run it.
pub fn run_as_server_user(command: &mut Command) -> Result<()> {
    use std::os::unix::process::CommandExt;
    if let Some(run_as) = RunAs::detect()? {
        command.uid(run_as.uid).gid(run_as.gid);
    }
    Ok(())
}

/// The OS user the testkit's PostgreSQL runs as when the tests run as root (`postgres`);
/// `None` when they do not (PostgreSQL then runs as the test process's own user). For a
/// component under test that runs PostgreSQL's programs itself (e.g. an agent's `run_as`).
pub fn server_user() -> Result<Option<String>> {
    Ok(RunAs::detect()?.map(|_| "postgres".to_owned()))
}

/// What a replica needs to know about its primary.
#[derive(Debug, Clone)]
struct ReplicaOf {
    primary_port: u16,
    slot: String,
}

/// Everything needed to spawn a postmaster on a prepared data directory.
struct Launch {
    name: &'static str,
    bin_dir: PathBuf,
    run_as: Option<RunAs>,
    dir: TempDir,
    data_dir: PathBuf,
    startup_timeout: Duration,
    replica_of: Option<ReplicaOf>,
    clock: Option<FakeClock>,
}

/// The `libfaketime` preload and the file holding the server's clock offset.
#[derive(Debug, Clone)]
struct FakeClock {
    library: PathBuf,
    file: PathBuf,
}

impl FakeClock {
    /// Writes the offset (whole seconds) through a temporary file and a rename: libfaketime
    /// re-reads the file on every clock call (`FAKETIME_NO_CACHE`), so it must never see a
    /// half-written one.
    fn set(&self, offset_secs: i64) -> Result<()> {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset_secs:+}\n"))
            .and_then(|()| std::fs::rename(&tmp, &self.file))
            .map_err(|e| TestkitError::file(&self.file, e))
    }

    fn apply(&self, command: &mut Command) {
        command
            .env("LD_PRELOAD", &self.library)
            .env("FAKETIME_TIMESTAMP_FILE", &self.file)
            .env("FAKETIME_NO_CACHE", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    }
}

/// A running PostgreSQL server (a primary, or a streaming replica of one) in its own temporary
/// directory.
///
/// Dropping it stops the postmaster with an immediate shutdown (SIGQUIT: the data is about to
/// be deleted, so there is nothing to checkpoint), removes the shared memory a killed server
/// left behind, drops a replica's replication slot on its primary if that primary still
/// answers, and deletes the directory.
///
/// Helper methods ([`execute`](Self::execute), [`query_scalar`](Self::query_scalar), ...) open
/// a fresh connection per call, bounded by a timeout, so they never reuse a connection that a
/// restart or kill has broken.
#[derive(Debug)]
pub struct PostgresServer {
    process: ServerProcess,
    port: u16,
    bin_dir: PathBuf,
    run_as: Option<RunAs>,
    data_dir: PathBuf,
    startup_timeout: Duration,
    replica_of: Option<ReplicaOf>,
    clock: Option<FakeClock>,
    // Declared last and removed only after `Drop::drop` has stopped the server.
    dir: TempDir,
}

impl PostgresServer {
    /// Starts a primary with the default settings.
    pub async fn start() -> Result<Self> {
        Self::builder().start().await
    }

    /// A builder for a primary with extra settings.
    pub fn builder() -> PostgresServerBuilder {
        PostgresServerBuilder::default()
    }

    /// Starts a streaming replica of this server.
    ///
    /// Runs `pg_basebackup -R -X stream -C -S <slot>`, which creates a physical replication
    /// slot on this server and writes `standby.signal` and `primary_conninfo`; the replica then
    /// starts on its own port and is returned once it is in recovery and its WAL receiver is
    /// streaming. Dropping the replica drops the slot again when this server still answers,
    /// so a finished replica does not make this server retain WAL.
    pub async fn start_replica(&self) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ha-testkit-pg-replica-")
            .tempdir()
            .map_err(|e| TestkitError::io("create a temporary directory for a replica", e))?;
        if let Some(run_as) = self.run_as {
            run_as.chown_tree(dir.path())?;
        }
        let data_dir = dir.path().join("data");
        let slot = format!(
            "ha_testkit_{}_{}",
            std::process::id(),
            SLOT_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut backup = pg_command(&self.bin_dir, "pg_basebackup", self.run_as, dir.path());
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(&data_dir)
            .args(["-R", "-X", "stream", "-C", "-S", &slot, "--no-sync"])
            // `-R` writes `primary_slot_name` too. Bound the connection: a paused primary
            // accepts TCP but never answers.
            .env("PGCONNECT_TIMEOUT", "10");
        run_blocking(backup).await?;
        Self::launch(Launch {
            name: "postgres-replica",
            bin_dir: self.bin_dir.clone(),
            run_as: self.run_as,
            dir,
            data_dir,
            startup_timeout: self.startup_timeout,
            replica_of: Some(ReplicaOf {
                primary_port: self.port,
                slot,
            }),
            clock: None,
        })
        .await
    }

    /// Spawns the postmaster on a free port and waits until it is ready, retrying on a fresh
    /// port when another process took the chosen one before the postmaster bound it.
    async fn launch(launch: Launch) -> Result<Self> {
        let log_path = launch.dir.path().join("postgres.log");
        let readiness = if launch.replica_of.is_some() {
            Readiness::Streaming
        } else {
            Readiness::Accepting
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port()?;
            let log_start = std::fs::metadata(&log_path).map_or(0, |m| m.len());
            let mut process = spawn_postmaster(
                launch.name,
                &launch.bin_dir,
                launch.run_as,
                launch.dir.path(),
                &launch.data_dir,
                port,
                launch.clock.as_ref(),
            )?;
            match wait_until_ready(&mut process, port, launch.startup_timeout, readiness).await {
                Ok(()) => {
                    return Ok(Self {
                        process,
                        port,
                        bin_dir: launch.bin_dir,
                        run_as: launch.run_as,
                        data_dir: launch.data_dir,
                        startup_timeout: launch.startup_timeout,
                        replica_of: launch.replica_of,
                        clock: launch.clock,
                        dir: launch.dir,
                    });
                }
                Err(TestkitError::Exited { .. })
                    if attempt < PORT_ATTEMPTS && port_was_taken(&log_path, log_start) =>
                {
                    tracing::debug!(port, "postgres could not bind its port; trying another");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The directory of the PostgreSQL programs this server runs from (`pg_ctl`,
    /// `pg_rewind`, `pg_basebackup`, …).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Program and arguments (no shell) that start this server again on its data directory,
    /// port and socket directory: `pg_ctl start -w -t 60`, logging to `pg_ctl.log` beside the
    /// data directory — for a component under test that starts PostgreSQL itself (run it as
    /// [`server_user`]). A postmaster started so is not this handle's child:
    /// [`kill`](Self::kill), [`restart`](Self::restart) and [`is_running`](Self::is_running)
    /// do not see it, but dropping the handle stops it too.
    pub fn start_command(&self) -> Vec<String> {
        vec![
            self.bin_dir.join("pg_ctl").display().to_string(),
            "start".into(),
            "-w".into(),
            "-t".into(),
            "60".into(),
            "-D".into(),
            self.data_dir.display().to_string(),
            "-l".into(),
            self.dir.path().join("pg_ctl.log").display().to_string(),
            "-o".into(),
            format!(
                "-p {} -c unix_socket_directories={}",
                self.port,
                self.dir.path().display()
            ),
        ]
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// `postgres://postgres@127.0.0.1:<port>/<database>`.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The TCP port, on 127.0.0.1. It stays the same across [`restart`](Self::restart)s.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The data directory (inside the server's temporary directory).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The postmaster's process id, if it has not been stopped or killed.
    pub fn pid(&self) -> Option<i32> {
        self.process.pid()
    }

    /// The physical replication slot this replica streams from on its primary; `None` for a
    /// server started as a primary.
    pub fn slot_name(&self) -> Option<&str> {
        self.replica_of.as_ref().map(|r| r.slot.as_str())
    }

    /// The last 50 lines of the server's log (PostgreSQL logs to stderr, captured in a file).
    pub fn log_tail(&self) -> String {
        self.process.log_tail(LOG_TAIL_LINES)
    }

    /// A new connection to the `postgres` database, as user `postgres`, over TCP.
    ///
    /// Establishing it is bounded by a 5 s timeout (a paused server accepts TCP but never
    /// answers). The caller owns the connection; queries on it are the caller's to bound.
    /// A plain connection rather than a pool, so nothing pooled outlives a kill or restart.
    pub async fn connect(&self) -> Result<PgConnection> {
        self.connect_to("postgres").await
    }

    /// Like [`connect`](Self::connect), to another database.
    pub async fn connect_to(&self, database: &str) -> Result<PgConnection> {
        connect(self.port, database, CONNECT_TIMEOUT)
            .await
            .map_err(|detail| self.query_error(format!("connect to {database}: {detail}")))
    }

    /// Runs `sql` (one or more statements, simple-query protocol) and returns the number of
    /// rows affected, within a 10 s timeout.
    pub async fn execute(&self, sql: &str) -> Result<u64> {
        let mut conn = self.connect().await?;
        let result =
            tokio::time::timeout(QUERY_TIMEOUT, sqlx::raw_sql(sql).execute(&mut conn)).await;
        close(conn).await;
        self.flatten(sql, result).map(|r| r.rows_affected())
    }

    /// Runs `sql` and returns the first column of its single row, within a 10 s timeout.
    ///
    /// ```no_run
    /// # async fn demo(pg: &ha_testkit::PostgresServer) -> ha_testkit::Result<()> {
    /// let n: i64 = pg.query_scalar("SELECT count(*) FROM pg_stat_activity").await?;
    /// # Ok(()) }
    /// ```
    pub async fn query_scalar<T>(&self, sql: &str) -> Result<T>
    where
        T: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres> + Send + Unpin,
    {
        self.query_scalar_within(sql, QUERY_TIMEOUT).await
    }

    async fn query_scalar_within<T>(&self, sql: &str, timeout: Duration) -> Result<T>
    where
        T: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres> + Send + Unpin,
    {
        let mut conn = self.connect().await?;
        let result = tokio::time::timeout(
            timeout,
            sqlx::query_scalar::<_, T>(sql).fetch_one(&mut conn),
        )
        .await;
        close(conn).await;
        self.flatten(sql, result)
    }

    /// Freezes the postmaster and every backend: connections stay open but nothing answers.
    ///
    /// PostgreSQL puts each child in its own session (`setsid()` in `InitPostmasterChild`),
    /// so a signal to the postmaster's process group misses the backends: they are signalled
    /// one by one, after the postmaster, which then cannot fork new ones.
    pub fn pause(&self) -> Result<()> {
        self.process.pause()?;
        for child in self.children() {
            let _ = nix::sys::signal::kill(child, Signal::SIGSTOP);
        }
        Ok(())
    }

    /// Thaws a paused server: every backend, then the postmaster.
    pub fn resume(&self) -> Result<()> {
        self.continue_children();
        self.process.resume()
    }

    /// Crashes the server: SIGKILL to the postmaster and every backend, and waits (up to 5 s)
    /// until all of them are gone. The next [`restart`](Self::restart) runs crash recovery.
    pub fn kill(&mut self) -> Result<()> {
        // Freeze the postmaster first, so it neither forks nor reacts to its children dying.
        self.process.pause()?;
        let children = self.children();
        for &child in &children {
            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
        }
        self.process.kill()?;
        // A backend still exiting keeps the old shared memory attached, and a restart would
        // refuse to start next to it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while children.iter().any(|&child| pid_running(child)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Stops the server gracefully (SIGINT: PostgreSQL's fast shutdown, which ends sessions
    /// and writes a shutdown checkpoint). Idempotent; a paused server is thawed first.
    pub fn stop(&mut self) {
        // The postmaster waits for its backends, which cannot exit while stopped.
        self.continue_children();
        self.process.stop();
    }

    /// The postmaster's descendants (backends and auxiliary processes), from `/proc`.
    fn children(&self) -> Vec<Pid> {
        self.process
            .pid()
            .map(|pid| descendants(Pid::from_raw(pid)))
            .unwrap_or_default()
    }

    fn continue_children(&self) {
        for child in self.children() {
            let _ = nix::sys::signal::kill(child, Signal::SIGCONT);
        }
    }

    /// Whether the postmaster is still running (paused counts as running).
    pub fn is_running(&mut self) -> bool {
        self.process.pid().is_some() && self.process.exit_status().is_none()
    }

    /// Starts the server again on the same port and data directory, stopping it gracefully
    /// first if it still runs. After [`kill`](Self::kill) this is crash recovery.
    ///
    /// Ready when it answers `SELECT 1`. A replica is not required to be streaming again, so
    /// that a replica can be restarted while its primary is down.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        let name = self.process.name().to_owned();
        self.process = spawn_postmaster(
            &name,
            &self.bin_dir,
            self.run_as,
            self.dir.path(),
            &self.data_dir,
            self.port,
            self.clock.as_ref(),
        )?;
        wait_until_ready(
            &mut self.process,
            self.port,
            self.startup_timeout,
            Readiness::Accepting,
        )
        .await
    }

    /// Steps the server's wall clock to `offset_secs` seconds from the real one (negative:
    /// behind it), while it runs: every later `now()` and `clock_timestamp()` of every
    /// session reads the stepped clock at once. The monotonic clock does not move. Only for a
    /// server started with [`PostgresServerBuilder::fake_clock`]; an error otherwise.
    pub fn step_clock(&self, offset_secs: i64) -> Result<()> {
        match &self.clock {
            Some(clock) => {
                tracing::info!(
                    port = self.port,
                    offset_secs,
                    "stepping the server's wall clock"
                );
                clock.set(offset_secs)
            }
            None => Err(TestkitError::io(
                "step the clock of a PostgreSQL server",
                std::io::Error::other("the server was not started with `fake_clock()`"),
            )),
        }
    }

    /// Whether the server is in recovery, i.e. a standby (`pg_is_in_recovery()`).
    pub async fn is_in_recovery(&self) -> Result<bool> {
        self.query_scalar("SELECT pg_is_in_recovery()").await
    }

    /// The current WAL write position of a primary (`pg_current_wal_lsn()`); an error on a
    /// server in recovery.
    pub async fn current_wal_lsn(&self) -> Result<Lsn> {
        let text: String = self
            .query_scalar("SELECT pg_current_wal_lsn()::text")
            .await?;
        self.parse_lsn(&text)
    }

    /// The last WAL position a replica has replayed (`pg_last_wal_replay_lsn()`); `None` on a
    /// server that never was in recovery.
    pub async fn replay_lsn(&self) -> Result<Option<Lsn>> {
        let text: Option<String> = self
            .query_scalar("SELECT pg_last_wal_replay_lsn()::text")
            .await?;
        text.map(|t| self.parse_lsn(&t)).transpose()
    }

    /// Waits until this replica has replayed WAL up to at least `lsn`, polling with a real
    /// deadline of `timeout`. The error says the last replayed position.
    pub async fn wait_for_replay(&self, lsn: Lsn, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            // A failed poll (e.g. a query timing out) is reported only if the deadline passes.
            // Each poll gets at most the time left, so a paused replica cannot stretch the wait.
            let left = timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(50));
            let poll = tokio::time::timeout(left, self.replay_lsn())
                .await
                .unwrap_or_else(|_| Err(self.query_error(format!("timed out after {left:?}"))));
            let last = match poll {
                Ok(Some(replayed)) if replayed >= lsn => return Ok(()),
                Ok(Some(replayed)) => format!("last replayed LSN {replayed}"),
                Ok(None) => {
                    return Err(self.query_error(format!(
                        "waiting for replay of {lsn}: not a replica (pg_last_wal_replay_lsn() \
                         is NULL)"
                    )));
                }
                Err(e) => format!("last poll failed: {e}"),
            };
            if started.elapsed() >= timeout {
                return Err(self.query_error(format!(
                    "WAL up to {lsn} not replayed after {:?}: {last}",
                    started.elapsed()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Promotes this replica to a primary (`SELECT pg_promote(true, 30)`), returning once it
    /// is out of recovery and accepts writes.
    pub async fn promote(&self) -> Result<()> {
        let sql = "SELECT pg_promote(true, 30)";
        if self.query_scalar_within(sql, PROMOTE_TIMEOUT).await? {
            Ok(())
        } else {
            Err(self.query_error(format!(
                "{sql} returned false; log tail:\n{}",
                self.log_tail()
            )))
        }
    }

    fn parse_lsn(&self, text: &str) -> Result<Lsn> {
        text.parse()
            .map_err(|e: ParseLsnError| self.query_error(e.to_string()))
    }

    fn query_error(&self, detail: String) -> TestkitError {
        TestkitError::Query {
            server: self.process.name().to_owned(),
            port: self.port,
            detail,
        }
    }

    fn flatten<T>(
        &self,
        sql: &str,
        result: std::result::Result<
            std::result::Result<T, sqlx::Error>,
            tokio::time::error::Elapsed,
        >,
    ) -> Result<T> {
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.query_error(format!("{sql}: {e}"))),
            Err(_) => Err(self.query_error(format!("{sql}: timed out"))),
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // Immediate shutdown: the data directory is deleted next, so a checkpoint would be
        // wasted work. PostgreSQL still removes its shared memory and lock files.
        // `ServerProcess::stop` then waits for the exit (its SIGINT is a no-op by then).
        self.continue_children();
        if let Some(pid) = self.process.pid().map(Pid::from_raw) {
            let _ = killpg(pid, Signal::SIGCONT);
            let _ = nix::sys::signal::kill(pid, Signal::SIGQUIT);
        }
        self.process.stop();
        stop_other_postmaster(&self.data_dir);
        remove_stale_shared_memory(&self.data_dir);
        if let Some(replica_of) = &self.replica_of {
            drop_slot_on_primary(replica_of);
        }
    }
}

/// Stops (SIGQUIT, immediate shutdown; then SIGKILL to what is left) a postmaster that
/// someone else started on `data_dir` — e.g. an agent under test with
/// [`PostgresServer::start_command`] — found through `postmaster.pid`, and waits up to 10 s
/// for it and its children to go.
fn stop_other_postmaster(data_dir: &Path) {
    let Some(pid) = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok())
        .map(Pid::from_raw)
    else {
        return;
    };
    let is_postgres = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.trim() == "postgres");
    if !is_postgres || !pid_running(pid) {
        return;
    }
    let children = descendants(pid);
    let _ = nix::sys::signal::kill(pid, Signal::SIGQUIT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    for child in children.into_iter().chain([pid]) {
        if pid_running(child) {
            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
        }
    }
}

/// Every descendant of `root`, found through the parent ids in `/proc/<pid>/stat`.
fn descendants(root: Pid) -> Vec<Pid> {
    let parents: Vec<(Pid, Pid)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may contain anything, so parse after ')'.
            let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?;
            Some((Pid::from_raw(pid), Pid::from_raw(ppid.parse().ok()?)))
        })
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|&&(_, ppid)| ppid == parent)
                .map(|&(pid, _)| pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// Whether `pid` exists and is not a zombie (a zombie has released its memory already).
fn pid_running(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// What "ready" means for a postmaster just spawned.
#[derive(Debug, Clone, Copy)]
enum Readiness {
    /// Answers `SELECT 1` over TCP.
    Accepting,
    /// In recovery, with its WAL receiver streaming from the primary.
    Streaming,
}

async fn wait_until_ready(
    process: &mut ServerProcess,
    port: u16,
    timeout: Duration,
    readiness: Readiness,
) -> Result<()> {
    process.wait_ready(timeout, || probe(port, readiness)).await
}

async fn probe(port: u16, readiness: Readiness) -> std::result::Result<(), String> {
    let mut conn = connect(port, "postgres", PROBE_TIMEOUT).await?;
    let result = match readiness {
        Readiness::Accepting => tokio::time::timeout(
            PROBE_TIMEOUT,
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&mut conn),
        )
        .await
        .map(|r| r.map(|_| ()).map_err(|e| e.to_string())),
        Readiness::Streaming => tokio::time::timeout(
            PROBE_TIMEOUT,
            sqlx::query_as::<_, (bool, Option<String>)>(
                "SELECT pg_is_in_recovery(), (SELECT status FROM pg_stat_wal_receiver)",
            )
            .fetch_one(&mut conn),
        )
        .await
        .map(|r| match r {
            Ok((true, Some(status))) if status == "streaming" => Ok(()),
            Ok((in_recovery, status)) => Err(format!(
                "pg_is_in_recovery() = {in_recovery}, WAL receiver status = {status:?}"
            )),
            Err(e) => Err(e.to_string()),
        }),
    };
    close(conn).await;
    result.unwrap_or_else(|_| Err(format!("probe query timed out after {PROBE_TIMEOUT:?}")))
}

/// Connects as `postgres` over TCP within `timeout`; the error is a description.
async fn connect(
    port: u16,
    database: &str,
    timeout: Duration,
) -> std::result::Result<PgConnection, String> {
    // Without the pgpass file and without TLS (sqlx is built without it): the servers are
    // ours, on loopback, with trust authentication.
    let options = PgConnectOptions::new_without_pgpass()
        .host("127.0.0.1")
        .port(port)
        .username("postgres")
        .database(database)
        .ssl_mode(PgSslMode::Disable)
        .application_name("ha-testkit");
    match tokio::time::timeout(timeout, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("connect timed out after {timeout:?}")),
    }
}

/// Closes politely, so the server log is not full of "unexpected EOF" lines; bounded because
/// the server may be paused.
async fn close(conn: PgConnection) {
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
}

/// A `Command` for one of PostgreSQL's binaries, run as `run_as` when set, with a clean
/// `PG*` environment (a stray `PGDATA` or `PGPORT` must not redirect a test server).
fn pg_command(bin_dir: &Path, binary: &str, run_as: Option<RunAs>, dir: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(bin_dir.join(binary));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            command.env_remove(key);
        }
    }
    // The test's working directory may not be readable by the `postgres` user.
    command.current_dir(dir);
    if let Some(run_as) = run_as {
        command.uid(run_as.uid).gid(run_as.gid).env("HOME", dir);
    }
    command
}

/// Spawns `postgres -D <data>` on `port`.
///
/// The port and socket directory go on the command line, not into `postgresql.conf`: they are
/// this instance's identity, and `pg_basebackup` copies the configuration files to replicas.
fn spawn_postmaster(
    name: &str,
    bin_dir: &Path,
    run_as: Option<RunAs>,
    dir: &Path,
    data_dir: &Path,
    port: u16,
    clock: Option<&FakeClock>,
) -> Result<ServerProcess> {
    let mut command = pg_command(bin_dir, "postgres", run_as, dir);
    if let Some(clock) = clock {
        clock.apply(&mut command);
    }
    command
        .arg("-D")
        .arg(data_dir)
        .args(["-p", &port.to_string()])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", dir.display()));
    // SIGINT is PostgreSQL's fast shutdown: sessions end, a shutdown checkpoint is written,
    // and the next start needs no recovery — what a test calling `stop()` expects.
    ServerProcess::spawn(
        name,
        port,
        command,
        &dir.join("postgres.log"),
        Signal::SIGINT,
    )
}

async fn run_blocking(command: Command) -> Result<String> {
    tokio::task::spawn_blocking(move || run_to_completion(command))
        .await
        .map_err(|e| TestkitError::io("run a PostgreSQL helper", std::io::Error::other(e)))?
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    std::fs::File::options()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| TestkitError::file(path, e))
}

/// Whether the log written since byte `from` says the port was taken.
fn port_was_taken(log_path: &Path, from: u64) -> bool {
    let log = std::fs::read(log_path).unwrap_or_default();
    let new = usize::try_from(from)
        .ok()
        .and_then(|from| log.get(from..))
        .unwrap_or(&log);
    let text = String::from_utf8_lossy(new);
    text.contains("could not bind") || text.contains("Address already in use")
}

/// A postmaster that was SIGKILLed leaves its SysV shared memory segment behind (the next
/// start on the same data directory would reuse it; there is none once the directory is
/// deleted). `postmaster.pid` still names it: line 7 is "<key> <id>".
fn remove_stale_shared_memory(data_dir: &Path) {
    let Ok(pid_file) = std::fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return; // A clean shutdown removes the file along with the segment.
    };
    let Some(id) = pid_file
        .lines()
        .nth(6)
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|id| id.parse::<u64>().ok())
    else {
        return;
    };
    let Ok(ipcrm) = binaries::find("ipcrm", &[], "util-linux") else {
        return;
    };
    let mut command = Command::new(ipcrm);
    command.args(["-m", &id.to_string()]);
    if let Err(e) = run_to_completion(command) {
        tracing::debug!(id, error = %e, "could not remove a killed postgres's shared memory");
    }
}

/// Drops a dropped replica's slot on its primary, so the primary stops retaining WAL for it.
///
/// Best effort: if the primary is gone, paused or unreachable, the attempt times out and
/// nothing else happens. It runs on its own thread and runtime because `Drop` cannot await and
/// may run inside the test's runtime.
fn drop_slot_on_primary(replica_of: &ReplicaOf) {
    let ReplicaOf { primary_port, slot } = replica_of.clone();
    let worker = std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => return tracing::debug!(error = %e, "no runtime to drop a replica slot"),
        };
        // The primary's walsender leaves only after noticing the replica is gone, and an
        // active slot cannot be dropped: wait (bounded) for it to become inactive.
        let sql = format!(
            "SET statement_timeout = '4s';
             DO $$ BEGIN
               FOR i IN 1..300 LOOP
                 EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_replication_slots
                                       WHERE slot_name = '{slot}' AND active);
                 PERFORM pg_sleep(0.01);
               END LOOP;
               PERFORM pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                 WHERE slot_name = '{slot}' AND NOT active;
             END $$;"
        );
        let result = runtime.block_on(async {
            tokio::time::timeout(SLOT_DROP_TIMEOUT, async {
                let mut conn = connect(primary_port, "postgres", CONNECT_TIMEOUT).await?;
                let result = sqlx::raw_sql(&sql).execute(&mut conn).await;
                close(conn).await;
                result.map(|_| ()).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|_| Err("timed out".to_owned()))
        });
        if let Err(e) = result {
            tracing::debug!(slot, primary_port, error = %e, "replica slot not dropped");
        }
    });
    let _ = worker.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_parses_and_displays_postgres_form() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn, Lsn(0x0000_0016_B374_D848));
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
        // PostgreSQL prints upper case but accepts either.
        assert_eq!("0/3000a8".parse::<Lsn>().unwrap(), Lsn(0x30_00A8));
    }

    #[test]
    fn port_taken_is_read_from_the_new_part_of_the_log_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(
            &log,
            "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use\n",
        )
        .unwrap();
        assert!(port_was_taken(&log, 0));
        let end = std::fs::metadata(&log).unwrap().len();
        assert!(!port_was_taken(&log, end));
        append(&log, "FATAL:  could not open file \"postgresql.conf\"\n").unwrap();
        assert!(!port_was_taken(&log, end));
    }

    #[test]
    fn lsn_round_trips() {
        for value in [0, 1, 0xFFFF_FFFF, 0x1_0000_0000, 0x16_B374_D848, u64::MAX] {
            let lsn = Lsn(value);
            assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn, "{lsn}");
        }
    }

    #[test]
    fn lsn_orders_numerically_not_textually() {
        let small: Lsn = "0/FFFFFFFF".parse().unwrap();
        let big: Lsn = "1/0".parse().unwrap();
        assert!(small < big);
        assert!("0/9".parse::<Lsn>().unwrap() < "0/10".parse::<Lsn>().unwrap());
    }

    #[test]
    fn lsn_rejects_bad_input() {
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "0/0/0",
            "G/0",
            "0/x1",
            "+1/0",
            "0/-1",
            " 0/0",
            "1FFFFFFFF/0",
            "0/100000000",
        ] {
            let err = bad.parse::<Lsn>().unwrap_err();
            assert!(err.to_string().contains("invalid LSN"), "{bad:?}: {err}");
        }
    }
}
