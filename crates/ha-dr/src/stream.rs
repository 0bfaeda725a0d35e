//! `wal-stream`: WAL archived as it is written, for a loss window of about a second instead
//! of `archive_timeout`.
//!
//! A supervisor runs `pg_receivewal --synchronous --no-loop` on a physical replication slot
//! into a private spool directory and restarts it with backoff when the server goes away.
//! Every segment it completes (and every timeline history file) is pushed on the same code
//! path as `wal-push` and then removed from the spool. The segment it is still receiving
//! (`<segment>.partial`, which `pg_receivewal` preallocates to full size with zeros) is
//! pushed as a streamed partial, `<segment>.stream.<end>` ([`WalName::Streamed`]), whenever
//! it changed and at least `partial_interval` passed since the last one, and at once when
//! `pg_receivewal` exits (the server was lost) or the stream is stopped. Each streamed
//! partial is a new object (never an overwrite); the one it supersedes, and every partial
//! of a segment once the complete segment is archived, is deleted after the newer object is
//! durable.
//!
//! [`WalName::Streamed`]: crate::WalName::Streamed

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ha_core::{Backoff, BackoffConfig, ConfigError};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::pg::PgTools;
use crate::pitr::{WalName, WalPushed};
use crate::repo::Repository;

/// How often the supervisor looks at the spool and at its child.
const POLL: Duration = Duration::from_millis(100);
/// How long a stopped `pg_receivewal` gets to flush and exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// A run of `pg_receivewal` that lasted this long resets the restart backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// How `wal-stream` connects and where it spools.
#[derive(Clone, Debug)]
pub struct WalStreamConfig {
    /// The server, as a connection string or URL of a role with the `REPLICATION`
    /// attribute, without a password: the password comes from `PGPASSWORD` or a passfile in
    /// the environment (an argv is readable by every local user).
    pub url: String,
    /// The physical replication slot (created if missing): the server keeps the WAL
    /// `wal-stream` has not received yet, across restarts of either side.
    pub slot: String,
    /// A private directory (`0700`, created if missing) for `pg_receivewal`'s files.
    pub spool: PathBuf,
    /// Where `pg_receivewal` is.
    pub tools: PgTools,
    /// The least time between two pushes of the segment being received (default 1 s):
    /// the loss window if `wal-stream` itself dies.
    pub partial_interval: Duration,
    /// The backoff between restarts of `pg_receivewal`.
    pub restart: BackoffConfig,
}

impl WalStreamConfig {
    /// The defaults for `url`, `slot` and `spool`.
    pub fn new(url: impl Into<String>, slot: impl Into<String>, spool: impl Into<PathBuf>) -> Self {
        Self {
            url: url.into(),
            slot: slot.into(),
            spool: spool.into(),
            tools: PgTools::default(),
            partial_interval: Duration::from_secs(1),
            restart: BackoffConfig {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(10),
                ..BackoffConfig::default()
            },
        }
    }

    /// Checks the fields: a slot name PostgreSQL accepts, no password in `url`, a
    /// positive `partial_interval`, a valid backoff.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        let slot_ok = !self.slot.is_empty()
            && self.slot.len() <= 63
            && self
                .slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !slot_ok {
            return Err(ConfigError::new(
                "slot",
                format!(
                    "{:?}: a replication slot name is 1 to 63 of [a-z0-9_]",
                    self.slot
                ),
            ));
        }
        if self.url.trim().is_empty() {
            return Err(ConfigError::new("url", "give the server to stream from"));
        }
        let (_, password) = crate::pg::split_password(&self.url);
        if password.is_some() || self.url.contains("password=") {
            return Err(ConfigError::new(
                "url",
                "holds a password; give it in PGPASSWORD or a passfile (PGPASSFILE), never in \
                 the URL, which ends up on a command line",
            ));
        }
        if self.partial_interval.is_zero() {
            return Err(ConfigError::new("partial_interval", "must be positive"));
        }
        ha_core::config::Validate::validate(&self.restart)
    }
}

/// Streams a server's WAL into a [`Repository`] (see the module docs).
#[derive(Clone)]
pub struct WalStream {
    repo: Repository,
    config: WalStreamConfig,
}

/// The spool's lock, held while a stream runs: two streams never share one spool.
type SpoolLock = nix::fcntl::Flock<fs::File>;

impl WalStream {
    /// A stream of `config.url` into `repo`; the config must validate.
    pub fn new(repo: Repository, config: WalStreamConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { repo, config })
    }

    /// Streams until `shutdown` is cancelled, then stops `pg_receivewal` (SIGINT: it
    /// flushes what it received), pushes what it left and returns. Errors only for what a
    /// restart cannot mend: a spool that is not private or is in use, a missing
    /// `pg_receivewal`. A lost server is retried with backoff.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let _lock = open_spool(&self.config.spool)?;
        let mut spool = Spool::new(self.config.spool.clone());
        let mut backoff = Backoff::new(self.config.restart.clone());
        // What the previous run left (a crash of wal-stream itself) goes first.
        spool.sweep(&self.repo, true).await;
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            let outcome = self.run_once(&mut spool, &shutdown).await;
            spool.sweep(&self.repo, true).await;
            match outcome {
                Ok(()) if shutdown.is_cancelled() => break,
                Ok(()) => {
                    tracing::warn!(slot = %self.config.slot, "pg_receivewal ended; restarting")
                }
                Err(e @ Error::Command { .. }) if is_missing_program(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!(slot = %self.config.slot, error = %e, "WAL streaming failed; restarting")
                }
            }
            metrics::counter!(ha_core::metric::DR_WAL_STREAM_RESTARTS_TOTAL).increment(1);
            if started.elapsed() >= HEALTHY_RUN {
                backoff.reset();
            }
            let delay = backoff.next().unwrap_or(self.config.restart.max);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        tracing::info!(slot = %self.config.slot, "WAL streaming stopped");
        Ok(())
    }

    fn command(&self) -> Command {
        let mut command = self.config.tools.command("pg_receivewal");
        command
            .arg(format!("--dbname={}", self.config.url))
            .arg("--slot")
            .arg(&self.config.slot)
            .arg("--no-password")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if std::env::var_os("PGCONNECT_TIMEOUT").is_none() {
            command.env("PGCONNECT_TIMEOUT", "10");
        }
        command
    }

    /// Creates the slot if missing, then runs `pg_receivewal` until it exits or `shutdown`.
    async fn run_once(&self, spool: &mut Spool, shutdown: &CancellationToken) -> Result<()> {
        let mut create = self.command();
        create.args(["--create-slot", "--if-not-exists"]);
        let created = tokio::task::spawn_blocking(move || {
            let mut child = spawn(create)?;
            child.wait()
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?;
        created?;

        let mut receive = self.command();
        receive
            .arg("--directory")
            .arg(&self.config.spool)
            .args(["--synchronous", "--no-loop"]);
        let mut child = spawn(receive)?;
        tracing::info!(slot = %self.config.slot, spool = %self.config.spool.display(), "pg_receivewal started");
        let mut last_partial = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    let stopped = tokio::task::spawn_blocking(move || child.stop())
                        .await
                        .map_err(|e| Error::Task(e.to_string()))?;
                    stopped?;
                    return Ok(());
                }
                () = tokio::time::sleep(POLL) => {}
            }
            if let Some(result) = child.exited()? {
                return result;
            }
            let due = last_partial.elapsed() >= self.config.partial_interval;
            spool.sweep(&self.repo, due).await;
            if due {
                last_partial = Instant::now();
            }
        }
    }
}

/// Whether `e` says the program could not be started at all.
fn is_missing_program(e: &Error) -> bool {
    matches!(e, Error::Command { detail, .. } if detail.starts_with("could not start"))
}

/// Creates `spool` (`0700`) or checks that it is private, and locks it.
fn open_spool(spool: &Path) -> Result<SpoolLock> {
    match fs::DirBuilder::new().mode(0o700).create(spool) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io("create", spool, e)),
    }
    let meta = fs::symlink_metadata(spool).map_err(|e| Error::io("stat", spool, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if !meta.is_dir() || mode & 0o077 != 0 {
        return Err(ConfigError::new(
            "spool",
            format!(
                "{} must be a directory only its owner may enter (mode 0700), it is {}{:o}",
                spool.display(),
                if meta.is_dir() {
                    "a directory of mode "
                } else {
                    "not a directory, mode "
                },
                mode
            ),
        )
        .into());
    }
    let path = spool.join(".ha-dr-wal-stream.lock");
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            Error::Config(ConfigError::new(
                "spool",
                format!(
                    "{} is in use by another wal-stream ({errno})",
                    spool.display()
                ),
            ))
        },
    )
}

/// `pg_receivewal`, its stderr forwarded to the log line by line (the last lines kept for
/// the error when it fails).
struct Receiver {
    child: Option<Child>,
    tail: Arc<Mutex<Vec<String>>>,
    /// Forwards stderr; ends when the child's end of the pipe closes.
    reader: Option<std::thread::JoinHandle<()>>,
}

fn spawn(mut command: Command) -> Result<Receiver> {
    command.stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|e| Error::Command {
        program: "pg_receivewal".into(),
        detail: format!(
            "could not start {:?}: {e} (install PostgreSQL's client programs, or give their \
             directory with --pg-bin)",
            command.get_program()
        ),
    })?;
    let tail = Arc::new(Mutex::new(Vec::new()));
    let reader = child.stderr.take().map(|stderr| {
        let tail = Arc::clone(&tail);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                tracing::info!(target: "ha_dr::stream::pg_receivewal", "{line}");
                if let Ok(mut tail) = tail.lock() {
                    tail.push(line);
                    let excess = tail.len().saturating_sub(3);
                    tail.drain(..excess);
                }
            }
        })
    });
    Ok(Receiver {
        child: Some(child),
        tail,
        reader,
    })
}

impl Receiver {
    /// The child's error, once it exited with `status`: its last lines of stderr (read to
    /// the end first: the pipe closed with the child).
    fn failure(&mut self, status: std::process::ExitStatus) -> Error {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let tail = self.tail.lock().map(|t| t.join(" | ")).unwrap_or_default();
        Error::Command {
            program: "pg_receivewal".into(),
            detail: format!("{status}: {tail}"),
        }
    }

    /// `Some` once the child exited (an error unless with status 0).
    fn exited(&mut self) -> Result<Option<Result<()>>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(Some(Ok(())));
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Ok(Some(if status.success() {
                    Ok(())
                } else {
                    Err(self.failure(status))
                }))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(Error::Command {
                program: "pg_receivewal".into(),
                detail: format!("wait: {e}"),
            }),
        }
    }

    /// Waits for the child to exit (blocking).
    fn wait(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = child.wait().map_err(|e| Error::Command {
            program: "pg_receivewal".into(),
            detail: format!("wait: {e}"),
        })?;
        if status.success() {
            Ok(())
        } else {
            Err(self.failure(status))
        }
    }

    /// SIGINT (`pg_receivewal` flushes and exits, as on Ctrl-C), then SIGKILL after a grace
    /// period (blocking).
    fn stop(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    tracing::warn!("pg_receivewal did not exit on SIGINT; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        self.child = None;
        Ok(())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the supervisor knows of the spool.
struct Spool {
    dir: PathBuf,
    /// The `.partial` file's modification time at its last push.
    pushed_partial: Option<(PathBuf, SystemTime)>,
    /// The streamed partial pushed last (deleted once superseded).
    previous: Option<crate::BackupId>,
    /// Files that could not be archived because the archive holds other bytes under their
    /// name: moved aside, reported once.
    refused: BTreeSet<String>,
}

impl Spool {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            pushed_partial: None,
            previous: None,
            refused: BTreeSet::new(),
        }
    }

    /// Pushes every completed file, and (with `partial`) the `.partial` segment if it
    /// changed since its last push. Failures are logged and retried at the next sweep;
    /// nothing is removed from the spool before it is archived.
    async fn sweep(&mut self, repo: &Repository, partial: bool) {
        let mut completed = Vec::new();
        let mut receiving = None;
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(spool = %self.dir.display(), error = %e, "cannot read the spool");
                return;
            }
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            match WalName::parse(&name) {
                Some(WalName::Segment { .. } | WalName::History { .. }) => {
                    completed.push(name);
                }
                Some(WalName::Partial { .. }) => receiving = Some(entry.path()),
                _ => {}
            }
        }
        // Histories first (a restore needs a timeline's history before its segments), then
        // segments in order.
        completed.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
        for name in completed {
            if self.refused.contains(&name) {
                continue;
            }
            let path = self.dir.join(&name);
            match repo.wal_push(&path).await {
                Ok(_) => {
                    if let Err(e) = fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove a pushed file from the spool");
                    }
                    if let Some(parsed @ WalName::Segment { .. }) = WalName::parse(&name) {
                        self.drop_streamed(repo, &parsed).await;
                    }
                }
                Err(e @ Error::TargetNotEmpty { .. }) => {
                    tracing::error!(file = %name, error = %e, "streamed WAL differs from the archived file of the same name; kept in the spool, not archived");
                    self.refused.insert(name);
                }
                Err(e) => {
                    tracing::warn!(file = %name, error = %e, "pushing streamed WAL failed; retrying");
                    return;
                }
            }
        }
        if let (true, Some(path)) = (partial, receiving) {
            self.push_partial(repo, &path).await;
        }
    }

    async fn push_partial(&mut self, repo: &Repository, path: &Path) {
        let modified = match fs::metadata(path).and_then(|m| m.modified()) {
            Ok(t) => t,
            Err(_) => return, // completed (renamed) meanwhile: the next sweep pushes it
        };
        if self
            .pushed_partial
            .as_ref()
            .is_some_and(|(p, t)| p == path && *t == modified)
        {
            return;
        }
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(_) => return,
        };
        // pg_receivewal preallocates the file with zeros and appends: everything past the
        // last non-zero byte is not received yet.
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if end < 40 {
            return; // nothing received into it yet (not even the page header)
        }
        let Some(segment) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".partial"))
        else {
            return;
        };
        let name = format!("{segment}.stream.{end:08X}");
        match repo.wal_push_bytes(name.clone(), bytes).await {
            Ok(pushed) => {
                if let WalPushed::Stored(m) = &pushed {
                    tracing::debug!(backup_id = %m.id, "streamed partial archived");
                }
                self.pushed_partial = Some((path.to_path_buf(), modified));
                let id = match &pushed {
                    WalPushed::Stored(m) | WalPushed::AlreadyArchived(m) => m.id.clone(),
                };
                // The one pushed before is superseded now that this one is durable (older
                // ones a crash left go with the complete segment).
                if let Some(previous) = self.previous.replace(id.clone())
                    && previous != id
                {
                    let store = Arc::clone(&repo.store);
                    let deleted =
                        tokio::task::spawn_blocking(move || store.delete(&previous)).await;
                    if !matches!(deleted, Ok(Ok(()))) {
                        tracing::warn!(file = %name, "cannot delete the superseded streamed partial");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(file = %name, error = %e, "pushing the streamed partial failed; retrying");
            }
        }
    }

    /// Deletes every streamed partial of `segment`, whose complete segment is archived now.
    async fn drop_streamed(&mut self, repo: &Repository, segment: &WalName) {
        let (store, target) = (Arc::clone(&repo.store), *segment);
        let result = tokio::task::spawn_blocking(move || -> Result<()> {
            for id in store.list()? {
                let parsed = id.as_str().strip_prefix("wal-").and_then(WalName::parse);
                if let Some(streamed @ WalName::Streamed { .. }) = parsed
                    && streamed.parts() == target.parts()
                {
                    store.delete(&id)?;
                }
            }
            Ok(())
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot delete superseded streamed partials"),
            Err(e) => tracing::warn!(error = %e, "cannot delete superseded streamed partials"),
        }
        if self
            .previous
            .as_ref()
            .and_then(|id| id.as_str().strip_prefix("wal-").and_then(WalName::parse))
            .is_some_and(|p| p.parts() == segment.parts())
        {
            self.previous = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyRing, LocalStore, MasterKey};

    #[test]
    fn config_errors_name_the_field() {
        let ok = WalStreamConfig::new("postgres://rep@db/postgres", "ha_dr", "/spool");
        assert!(ok.validate().is_ok());
        let field = |c: WalStreamConfig| c.validate().unwrap_err().to_string();
        let mut bad = ok.clone();
        bad.slot = "Has-Dash".into();
        assert!(field(bad).contains("slot"));
        let mut bad = ok.clone();
        bad.url = "postgres://rep:secret@db/postgres".into();
        let text = field(bad);
        assert!(
            text.contains("url") && text.contains("PGPASSWORD"),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
        let mut bad = ok.clone();
        bad.url = "host=db user=rep password=secret".into();
        assert!(field(bad).contains("url"));
        let mut bad = ok;
        bad.partial_interval = Duration::ZERO;
        assert!(field(bad).contains("partial_interval"));
    }

    #[tokio::test]
    async fn a_missing_pg_receivewal_fails_clearly_and_a_shared_spool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(
            LocalStore::open(dir.path().join("store")).unwrap(),
            KeyRing::new(MasterKey::from_bytes([3; 32])),
        );
        let spool = dir.path().join("spool");
        let mut config = WalStreamConfig::new("postgres://rep@127.0.0.1:1/x", "s", &spool);
        config.tools = PgTools::in_dir(dir.path().join("no-such-bin"));
        let stream = WalStream::new(repo.clone(), config.clone()).unwrap();
        let err = stream.run(CancellationToken::new()).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("pg_receivewal") && text.contains("could not start"),
            "{text}"
        );
        let mode = fs::metadata(&spool).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);

        let _held = open_spool(&spool).unwrap();
        let err = WalStream::new(repo.clone(), config.clone())
            .unwrap()
            .run(CancellationToken::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(_held);

        fs::set_permissions(&spool, fs::Permissions::from_mode(0o755)).unwrap();
        let err = WalStream::new(repo, config)
            .unwrap()
            .run(CancellationToken::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("0700"), "{err}");
    }
}
