//! PostgreSQL: `pg_dump`/`pg_restore` child processes, and the few queries around them
//! (snapshot export and row counts, database existence, create, rename, drop).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

use sqlx::{Connection, PgConnection};

use crate::error::{Error, Result};

/// Where the PostgreSQL client programs are (`pg_dump`, `pg_restore`).
///
/// Use the programs of the server's major version or newer: `pg_dump` refuses newer servers.
#[derive(Clone, Debug, Default)]
pub struct PgTools {
    /// A directory holding them (e.g. `/usr/lib/postgresql/15/bin`); `None`: look on `PATH`.
    pub bin_dir: Option<PathBuf>,
}

impl PgTools {
    /// Programs from `bin_dir`.
    pub fn in_dir(bin_dir: impl Into<PathBuf>) -> Self {
        Self {
            bin_dir: Some(bin_dir.into()),
        }
    }

    pub(crate) fn command(&self, program: &str) -> Command {
        let path = match &self.bin_dir {
            Some(dir) => dir.join(program),
            None => PathBuf::from(program),
        };
        let mut command = Command::new(path);
        // The master key is never a child's business.
        command.env_remove(crate::key::KEY_ENV);
        command
    }

    /// `program` connecting to `url`: the URL goes into `--dbname` without its password, and
    /// the password reaches the child through `PGPASSWORD` in its environment (readable only
    /// by the same user), never through its argv (readable by everyone in `ps` and
    /// `/proc/<pid>/cmdline`).
    pub(crate) fn connecting(&self, program: &str, url: &str) -> Command {
        let (url, password) = split_password(url);
        let mut command = self.command(program);
        command.arg(format!("--dbname={url}"));
        match password {
            Some(password) => command.env("PGPASSWORD", password),
            None => command.env_remove("PGPASSWORD"),
        };
        command
    }
}

/// `url` without its password (in the user info or a `password=` query parameter), and the
/// password, percent-decoded.
pub(crate) fn split_password(url: &str) -> (String, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let (before_query, query) = rest
        .split_once('?')
        .map_or((rest, None), |(b, q)| (b, Some(q)));
    let (authority, path) = before_query
        .find('/')
        .map_or((before_query, ""), |i| before_query.split_at(i));
    let mut password = None;
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, secret)) => {
                password = Some(percent_decode(secret));
                format!("{name}@{host}")
            }
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let query = query.map(|query| {
        query
            .split('&')
            .filter(|pair| match pair.strip_prefix("password=") {
                Some(secret) => {
                    password = Some(percent_decode(secret));
                    false
                }
                None => true,
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    let url = match query {
        Some(query) if !query.is_empty() => format!("{scheme}://{authority}{path}?{query}"),
        _ => format!("{scheme}://{authority}{path}"),
    };
    (url, password)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A child process that is killed and reaped if dropped before [`wait`](Self::wait): an
/// abandoned backup or restore leaves no `pg_dump` behind.
pub(crate) struct ChildGuard {
    child: Option<Child>,
    program: String,
    stderr: Option<JoinHandle<String>>,
}

/// How much of a child's stderr is kept for the error message.
const STDERR_TAIL: usize = 4096;

impl ChildGuard {
    /// Spawns `command` with stderr captured (its tail goes into errors).
    pub(crate) fn spawn(mut command: Command, program: &str) -> Result<Self> {
        command.stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| Error::Command {
            program: program.to_owned(),
            detail: format!("could not start {:?}: {e}", command.get_program()),
        })?;
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut tail: Vec<u8> = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 2 * STDERR_TAIL {
                        tail.drain(..tail.len() - STDERR_TAIL);
                    }
                }
                let start = tail.len().saturating_sub(STDERR_TAIL);
                String::from_utf8_lossy(&tail[start..]).trim().to_owned()
            })
        });
        Ok(Self {
            child: Some(child),
            program: program.to_owned(),
            stderr,
        })
    }

    pub(crate) fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Waits for exit; a non-zero status is an error with the tail of stderr.
    pub(crate) fn wait(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        drop(child.stdin.take());
        let status = child.wait().map_err(|e| Error::Command {
            program: self.program.clone(),
            detail: format!("wait: {e}"),
        })?;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if status.success() {
            Ok(())
        } else {
            Err(Error::Command {
                program: self.program.clone(),
                detail: format!("{status}: {}", last_line(&stderr)),
            })
        }
    }
}

fn last_line(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(3);
    lines[start..].join(" | ")
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `url` with its database replaced by `database`.
pub(crate) fn with_database(url: &str, database: &str) -> Result<String> {
    let bad = || {
        Error::Config(ha_core::ConfigError::new(
            "pg url",
            format!(
                "must look like postgresql://user@host:port/database, got {}",
                redact(url)
            ),
        ))
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    if scheme != "postgres" && scheme != "postgresql" {
        return Err(bad());
    }
    let (before_query, query) = rest.find('?').map_or((rest, ""), |i| rest.split_at(i));
    let authority = before_query.split('/').next().unwrap_or_default();
    Ok(format!(
        "{scheme}://{authority}/{}{query}",
        percent_encode(database)
    ))
}

/// The database named in `url`.
pub(crate) fn database_of(url: &str) -> Result<String> {
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let before_query = rest.split('?').next().unwrap_or_default();
    let db = before_query
        .split_once('/')
        .map(|(_, path)| path)
        .unwrap_or_default();
    if db.is_empty() || db.contains('%') {
        return Err(Error::Config(ha_core::ConfigError::new(
            "pg url",
            format!(
                "must name the database in its path (plain characters), got {}",
                redact(url)
            ),
        )));
    }
    Ok(db.to_owned())
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `url` without password or query parameters, fit for manifests and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".into();
    };
    let rest = rest.split('?').next().unwrap_or_default();
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or_default();
            format!("{user}@{host}")
        }
        None => authority.to_owned(),
    };
    format!("{scheme}://{authority}/{path}")
}

/// `"name"` quoted as an SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(crate) async fn connect(url: &str) -> Result<PgConnection> {
    PgConnection::connect(url)
        .await
        .map_err(|source| Error::Postgres {
            context: format!("connect to {}", redact(url)),
            source,
        })
}

fn query_err(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
    let context = context.into();
    move |source| Error::Postgres { context, source }
}

/// Exact row counts of every user table, read by `conn` (in its current transaction).
pub(crate) async fn table_rows(conn: &mut PgConnection) -> Result<BTreeMap<String, u64>> {
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p') \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
           AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
         ORDER BY 1, 2",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(query_err("list tables"))?;
    let mut rows = BTreeMap::new();
    for (schema, table) in tables {
        let sql = format!(
            "SELECT count(*) FROM {}.{}",
            quote_ident(&schema),
            quote_ident(&table)
        );
        let count: i64 = sqlx::query_scalar(&sql)
            .fetch_one(&mut *conn)
            .await
            .map_err(query_err(format!("count rows of {schema}.{table}")))?;
        rows.insert(
            format!("{schema}.{table}"),
            u64::try_from(count).unwrap_or_default(),
        );
    }
    Ok(rows)
}

/// A repeatable-read transaction that exported its snapshot for `pg_dump --snapshot`, with
/// the row counts seen in it. Keep it open until `pg_dump` exits.
pub(crate) struct Snapshot {
    conn: PgConnection,
    pub(crate) name: String,
    pub(crate) table_rows: BTreeMap<String, u64>,
}

impl Snapshot {
    pub(crate) async fn take(url: &str) -> Result<Self> {
        let mut conn = connect(url).await?;
        sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut conn)
            .await
            .map_err(query_err("begin snapshot transaction"))?;
        let name: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut conn)
            .await
            .map_err(query_err("export snapshot"))?;
        let table_rows = table_rows(&mut conn).await?;
        Ok(Self {
            conn,
            name,
            table_rows,
        })
    }

    pub(crate) async fn close(mut self) {
        let _ = sqlx::query("COMMIT").execute(&mut self.conn).await;
        let _ = self.conn.close().await;
    }
}

/// Spawns `pg_dump` of the database at `url` in the custom format, uncompressed (zstd
/// compresses it next), reading `snapshot`.
pub(crate) fn spawn_dump(tools: &PgTools, url: &str, snapshot: &str) -> Result<ChildGuard> {
    ChildGuard::spawn(dump_command(tools, url, snapshot), "pg_dump")
}

fn dump_command(tools: &PgTools, url: &str, snapshot: &str) -> Command {
    let mut command = tools.connecting("pg_dump", url);
    command
        .args(["--format=custom", "--compress=0", "--no-sync"])
        .arg(format!("--snapshot={snapshot}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    command
}

/// Spawns `pg_restore` into the database at `url`, reading the archive from stdin.
pub(crate) fn spawn_restore(tools: &PgTools, url: &str) -> Result<ChildGuard> {
    ChildGuard::spawn(restore_command(tools, url), "pg_restore")
}

fn restore_command(tools: &PgTools, url: &str) -> Command {
    let mut command = tools.connecting("pg_restore", url);
    command
        .args(["--format=custom", "--exit-on-error"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    command
}

/// The server's maintenance connection (database `postgres`) for `url`'s server.
pub(crate) async fn admin(url: &str) -> Result<PgConnection> {
    connect(&with_database(url, "postgres")?).await
}

pub(crate) async fn database_exists(admin: &mut PgConnection, name: &str) -> Result<bool> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut *admin)
        .await
        .map_err(query_err(format!("look up database {name}")))?;
    Ok(found.is_some())
}

/// Runs one statement, unprepared (`CREATE`/`DROP`/`ALTER DATABASE`, which take no
/// parameters). Not `raw_sql`: its future cannot be proven `Send` for every lifetime, which
/// an `async_trait` caller (the scheduler's runner) needs (rust-lang/rust#110338).
pub(crate) async fn execute(admin: &mut PgConnection, sql: &str) -> Result<()> {
    sqlx::query(sql)
        .persistent(false)
        .execute(&mut *admin)
        .await
        .map(|_| ())
        .map_err(query_err(sql.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    #[test]
    fn children_get_the_password_in_their_environment_never_in_argv_and_never_the_key() {
        let tools = super::PgTools::default();
        let url = "postgres://app:s3cr%40t@db:5432/orders?sslmode=disable&password=other";
        for command in [
            super::dump_command(&tools, url, "snap-1"),
            super::restore_command(&tools, url),
        ] {
            let argv: Vec<String> = command
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            assert!(
                argv.iter()
                    .all(|a| !a.contains("s3cr") && !a.contains("other")),
                "{argv:?}"
            );
            assert!(
                argv.contains(&"--dbname=postgres://app@db:5432/orders?sslmode=disable".to_owned()),
                "{argv:?}"
            );
            let envs: Vec<(&OsStr, Option<&OsStr>)> = command.get_envs().collect();
            assert!(
                envs.contains(&(OsStr::new("PGPASSWORD"), Some(OsStr::new("other")))),
                "the last password given wins, as libpq reads it: {envs:?}"
            );
            assert!(
                envs.contains(&(OsStr::new(crate::key::KEY_ENV), None)),
                "HA_DR_KEY is removed from the child: {envs:?}"
            );
        }
        let (plain, password) = super::split_password("postgres://app:p%2Fw@h/db");
        assert_eq!(
            (plain.as_str(), password.as_deref()),
            ("postgres://app@h/db", Some("p/w"))
        );
        let (plain, password) = super::split_password("postgresql://h:5/db");
        assert_eq!((plain.as_str(), password), ("postgresql://h:5/db", None));
    }

    use super::*;

    #[test]
    fn urls_are_rewritten_and_redacted() {
        let url = "postgresql://u:secret@127.0.0.1:5432/app?sslmode=disable";
        assert_eq!(
            with_database(url, "other db").unwrap(),
            "postgresql://u:secret@127.0.0.1:5432/other%20db?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h", "x").unwrap(),
            "postgres://h/x"
        );
        assert_eq!(database_of(url).unwrap(), "app");
        assert!(database_of("postgres://h/").is_err());
        assert_eq!(redact(url), "postgresql://u@127.0.0.1:5432/app");
        assert!(with_database("mysql://h/x", "y").is_err());
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
