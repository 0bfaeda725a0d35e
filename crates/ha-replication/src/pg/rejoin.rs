//! Rejoin: the commands with which a [`PgAgent`](super::PgAgent) brings its own database back
//! as a replica of the leader's (`pg_rewind`, or a re-clone with `pg_basebackup`), and starts
//! it — in place when this node leads, always as a standby (`standby.signal`) otherwise.
//!
//! The agent decides *when* (see its module docs, "Rejoin"); this module only does the steps,
//! each bounded by a timeout:
//!
//! 1. **Stop** a running former primary cleanly (`pg_ctl stop -m fast`), so `pg_rewind` gets
//!    a target that was shut down (one that crashed is crash-recovered by `pg_rewind` itself,
//!    PostgreSQL ≥ 13).
//! 2. **Remember** the member's own `primary_conninfo` and `primary_slot_name` from
//!    `postgresql.auto.conf` — `pg_rewind` and `pg_basebackup` copy the leader's file over it.
//! 3. **Rewind**, only once the leader's database is out of recovery (asked with `psql`;
//!    the agent waits for it before it even stops its own): (`CHECKPOINT` on the leader's
//!    database with `psql` — a just promoted
//!    leader records its new timeline in `pg_control` only at its next checkpoint, and
//!    `pg_rewind` would find nothing to do before it —, then
//!    `pg_rewind --target-pgdata … --source-server …`), which needs
//!    `wal_log_hints = on` or data checksums, and the target's WAL back to the last
//!    checkpoint the two timelines share (`wal_keep_size`; the agent does not pass
//!    `--restore-target-wal`). If it fails and `reclone` is set, **re-clone**:
//!    `pg_basebackup -X stream` into `<data_dir>.rejoin-new`; only once it is complete is the
//!    old directory renamed to `<data_dir>.rejoin-old` (kept for the operator; the previous
//!    one of that name is removed then) and the new one renamed into place.
//! 4. **Configure** it as a standby: `primary_conninfo` = the member's own keywords with the
//!    leader's host and port (or, if it had none, `user`, `application_name` = the member's
//!    name and `passfile` from this config), its own `primary_slot_name` (or none), written to
//!    `postgresql.auto.conf` through a temporary file and a rename, and `standby.signal`.
//! 5. **Start** with `start_command`.
//!
//! # What runs as whom
//!
//! Every command here (`pg_ctl`, `psql`, `pg_rewind`, `pg_basebackup`, `pg_controldata` from
//! `bin_dir`, and `start_command`) runs as the OS user `run_as` when it is set (the agent must
//! then run as root), else as the agent's own user; PostgreSQL refuses to run as root. Files
//! the agent writes into the data directory get the data directory's owner. No password is
//! ever put on a command line: the tools read `passfile` (`PGPASSFILE`) or the user's
//! `~/.pgpass`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ha_core::config::{self, ConfigError, Validate};
use serde::Deserialize;

use crate::pg::agent::{Upstream, quote_value, repoint_conninfo};

/// How a [`PgAgent`](super::PgAgent) brings its database back (off unless `enabled`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RejoinConfig {
    /// Rejoin former primaries, start a database that is down, restart a crashed primary in
    /// place (default false: a former primary is only reported, as before).
    pub enabled: bool,
    /// The database's data directory (required when enabled).
    pub data_dir: Option<PathBuf>,
    /// Where `pg_ctl`, `pg_rewind`, `pg_basebackup`, `pg_controldata` and `psql` are
    /// (default `/usr/lib/postgresql/15/bin`).
    pub bin_dir: PathBuf,
    /// Program and arguments (no shell) that start this PostgreSQL and return once it runs,
    /// e.g. `["/usr/lib/postgresql/15/bin/pg_ctl", "start", "-w", "-D", "/var/lib/…",
    /// "-l", "/var/log/…"]` (required when enabled). Run as `run_as`.
    pub start_command: Vec<String>,
    /// The OS user every command of the rejoin runs as (e.g. `postgres`; the agent must run
    /// as root then). Unset: the agent's own user.
    pub run_as: Option<String>,
    /// The role `pg_rewind` and `pg_basebackup` connect to the leader's database as (a
    /// superuser, or a role with the rights `pg_rewind` documents, `pg_checkpoint` and `REPLICATION`;
    /// default `postgres`); also the `user` of a `primary_conninfo` built from scratch.
    pub source_user: String,
    /// The database `pg_rewind` connects to (default `postgres`).
    pub source_dbname: String,
    /// A libpq password file for the tools (`PGPASSFILE`) and a `primary_conninfo` built from
    /// scratch; unset: none (trust, certificates, or the OS user's `~/.pgpass`).
    pub passfile: Option<PathBuf>,
    /// When `pg_rewind` fails (or is impossible: no `wal_log_hints`/checksums), re-clone the
    /// data directory from the leader with `pg_basebackup` (default false). The data
    /// directory's parent must be writable by `run_as` and have room for a second copy.
    pub reclone: bool,
    /// How long this node, leading, restarts its crashed primary in place before it gives the
    /// leadership up (default 300 s, as Patroni's `primary_start_timeout`; 0: at once).
    #[serde(with = "config::duration")]
    pub primary_start_timeout: Duration,
    /// After giving the leadership up that way, how long the member stays ineligible, so that
    /// a replica takes over (default 30 s).
    #[serde(with = "config::duration")]
    pub step_down_hold: Duration,
    /// Bound on `start_command`, `pg_ctl stop`/`status` and `pg_controldata` (default 120 s).
    #[serde(with = "config::duration")]
    pub command_timeout: Duration,
    /// Bound on `pg_rewind` and on `pg_basebackup` (default 1 h).
    #[serde(with = "config::duration")]
    pub copy_timeout: Duration,
    /// After a failed rejoin or start, the next attempt waits this long (default 10 s).
    #[serde(with = "config::duration")]
    pub retry_interval: Duration,
    /// A standby pointed at the leader's database that has not streamed from it for this
    /// long, while the leader's database is a primary, is taken for diverged (it received
    /// WAL past the point where the leader's timeline forked, as an asynchronous replica
    /// can): it is stopped, rewound (`pg_rewind` changes nothing where nothing diverged) and
    /// started again (default 30 s).
    #[serde(with = "config::duration")]
    pub standby_stuck_after: Duration,
}

impl Default for RejoinConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            data_dir: None,
            bin_dir: PathBuf::from("/usr/lib/postgresql/15/bin"),
            start_command: Vec::new(),
            run_as: None,
            source_user: "postgres".into(),
            source_dbname: "postgres".into(),
            passfile: None,
            reclone: false,
            primary_start_timeout: Duration::from_secs(300),
            step_down_hold: Duration::from_secs(30),
            command_timeout: Duration::from_secs(120),
            copy_timeout: Duration::from_secs(3600),
            retry_interval: Duration::from_secs(10),
            standby_stuck_after: Duration::from_secs(30),
        }
    }
}

impl Validate for RejoinConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::positive("command_timeout", self.command_timeout)?;
        config::positive("copy_timeout", self.copy_timeout)?;
        config::positive("retry_interval", self.retry_interval)?;
        config::positive("standby_stuck_after", self.standby_stuck_after)?;
        config::non_empty("source_user", &self.source_user)?;
        config::non_empty("source_dbname", &self.source_dbname)?;
        config::ensure(
            self.start_command.first().is_none_or(|p| !p.is_empty()),
            "start_command",
            || "the program must not be empty".into(),
        )?;
        config::ensure(
            self.run_as.as_deref().is_none_or(|u| !u.trim().is_empty()),
            "run_as",
            || "must not be empty when set".into(),
        )?;
        if !self.enabled {
            return Ok(());
        }
        config::ensure(
            self.data_dir.as_ref().is_some_and(|d| d.is_absolute()),
            "data_dir",
            || "must be an absolute path when `enabled`".into(),
        )?;
        config::ensure(!self.start_command.is_empty(), "start_command", || {
            "must be set when `enabled`".into()
        })?;
        config::ensure(self.bin_dir.is_absolute(), "bin_dir", || {
            "must be an absolute path".into()
        })
    }
}

/// A step of a rejoin that failed, with what it was doing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RejoinError {
    /// A command could not be run, timed out, or exited with an error.
    #[error("{what}: {program}: {detail}")]
    Command {
        /// The step, in words.
        what: &'static str,
        /// The program.
        program: String,
        /// Why: the exit status and the end of its stderr, or the spawn error.
        detail: String,
    },
    /// A file of the data directory could not be read or written.
    #[error("{what}: {}: {source}", path.display())]
    File {
        /// The step, in words.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `run_as` names no OS user.
    #[error("run_as: no OS user `{0}`")]
    NoUser(String),
}

/// How the database was brought back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejoinVia {
    /// `pg_rewind` from the leader's database.
    Rewind,
    /// A fresh copy from the leader's database (`pg_basebackup`); the old data directory is
    /// kept beside it (`<data_dir>.rejoin-old`).
    Reclone,
    /// Its timeline had not diverged (it was a standby already): only configured and started.
    Start,
}

impl RejoinVia {
    /// The `outcome` label of `ha_pg_agent_rejoins_total`.
    pub fn outcome(self) -> &'static str {
        match self {
            RejoinVia::Rewind => "rewind",
            RejoinVia::Reclone => "reclone",
            RejoinVia::Start => "start",
        }
    }
}

/// The member's own replication settings, read before a rewind or re-clone replaces
/// `postgresql.auto.conf` with the leader's.
#[derive(Debug, Clone, Default)]
struct OwnSettings {
    conninfo: Option<String>,
    slot: Option<String>,
}

/// Runs the rejoin's commands for one data directory (see the [module docs](self)).
#[derive(Debug, Clone)]
pub(crate) struct Rejoiner {
    config: RejoinConfig,
    data_dir: PathBuf,
    member: String,
}

impl Rejoiner {
    /// `None` unless `config.enabled` (validated: then `data_dir` is set).
    pub(crate) fn new(config: &RejoinConfig, member: &str) -> Option<Self> {
        let data_dir = config.data_dir.clone()?;
        config.enabled.then(|| Self {
            config: config.clone(),
            data_dir,
            member: member.to_owned(),
        })
    }

    pub(crate) fn config(&self) -> &RejoinConfig {
        &self.config
    }

    /// Whether a postmaster runs on the data directory (`pg_ctl status`).
    pub(crate) async fn is_running(&self) -> Result<bool, RejoinError> {
        let mut command = self.tool("pg_ctl")?;
        command.arg("status").arg("-D").arg(&self.data_dir);
        let output = self
            .output(command, "pg_ctl status", self.config.command_timeout)
            .await?;
        // 0: running; 3: not running; 4: no accessible data directory.
        match output.status.code() {
            Some(0) => Ok(true),
            Some(3) => Ok(false),
            _ => Err(failed("pg_ctl status", "pg_ctl", &output)),
        }
    }

    /// Whether `standby.signal` is in the data directory.
    pub(crate) fn is_standby(&self) -> bool {
        self.data_dir.join("standby.signal").exists()
    }

    /// `pg_controldata`'s "Database cluster state" (e.g. `in production`, `shut down`).
    pub(crate) async fn cluster_state(&self) -> Result<String, RejoinError> {
        let mut command = self.tool("pg_controldata")?;
        command.arg("-D").arg(&self.data_dir);
        let output = self
            .output(command, "pg_controldata", self.config.command_timeout)
            .await?;
        if !output.status.success() {
            return Err(failed("pg_controldata", "pg_controldata", &output));
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Database cluster state:"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default())
    }

    /// Whether the leader's database is out of recovery (`psql`, as `source_user`): a
    /// rewind against a leader whose promotion has not finished would find the timelines
    /// not diverged yet and leave this database ahead of it.
    pub(crate) async fn leader_is_primary(&self, leader: &Upstream) -> Result<bool, RejoinError> {
        let mut command = self.tool("psql")?;
        command
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-c", "SELECT pg_is_in_recovery()", "-d"])
            .arg(self.source_conninfo(leader));
        let output = self
            .output(
                command,
                "asking the leader's database whether it is a primary",
                self.config.command_timeout,
            )
            .await?;
        if !output.status.success() {
            return Err(failed(
                "asking the leader's database whether it is a primary",
                "psql",
                &output,
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim() == "f")
    }

    /// The leader's database as `source_user` on `source_dbname`, no password.
    fn source_conninfo(&self, leader: &Upstream) -> String {
        format!(
            "{} user={} dbname={} connect_timeout=10",
            leader.conninfo(),
            quote_value(&self.config.source_user),
            quote_value(&self.config.source_dbname)
        )
    }

    /// Stops the postmaster with a fast shutdown (a clean one: a shutdown checkpoint).
    pub(crate) async fn stop(&self) -> Result<(), RejoinError> {
        let mut command = self.tool("pg_ctl")?;
        command
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "-t"])
            .arg(self.config.command_timeout.as_secs().max(1).to_string());
        self.run(command, "stopping PostgreSQL", self.config.command_timeout)
            .await
    }

    /// Runs `start_command`.
    pub(crate) async fn start(&self) -> Result<(), RejoinError> {
        let (program, args) =
            self.config
                .start_command
                .split_first()
                .ok_or_else(|| RejoinError::Command {
                    what: "starting PostgreSQL",
                    program: String::new(),
                    detail: "no start_command".into(),
                })?;
        let mut command = self.command(Path::new(program))?;
        command.args(args);
        self.run(command, "starting PostgreSQL", self.config.command_timeout)
            .await
    }

    /// Steps 2–4 for a stopped former primary: rewind (or re-clone) from `leader`, then
    /// configure it as a standby of `leader`. Never starts it.
    pub(crate) async fn rewind_or_reclone(
        &self,
        leader: &Upstream,
    ) -> Result<RejoinVia, RejoinError> {
        let own = self.own_settings()?;
        let via = match self.rewind(leader).await {
            Ok(()) => RejoinVia::Rewind,
            Err(e) if self.config.reclone => {
                tracing::warn!(member = %self.member, error = %e, "pg_rewind failed: re-cloning");
                self.reclone(leader).await?;
                RejoinVia::Reclone
            }
            Err(e) => return Err(e),
        };
        self.configure_standby(Some(leader), &own)?;
        Ok(via)
    }

    /// Step 4 alone, for a database whose timeline did not diverge (a stopped standby), or
    /// with no leader known (`standby.signal` only: it must not start as a primary).
    pub(crate) fn make_standby(&self, leader: Option<&Upstream>) -> Result<(), RejoinError> {
        let own = self.own_settings()?;
        self.configure_standby(leader, &own)
    }

    async fn rewind(&self, leader: &Upstream) -> Result<(), RejoinError> {
        tracing::info!(member = %self.member, %leader, "pg_rewind from the leader's database");
        let source = self.source_conninfo(leader);
        // A just promoted leader writes its new timeline into pg_control only at its next
        // checkpoint; before it, pg_rewind reads the old one and finds "no rewind required".
        let mut checkpoint = self.tool("psql")?;
        checkpoint
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "CHECKPOINT",
                "-d",
            ])
            .arg(&source);
        self.run(
            checkpoint,
            "a checkpoint on the leader's database",
            self.config.command_timeout,
        )
        .await?;
        let mut command = self.tool("pg_rewind")?;
        command
            .arg(format!("--target-pgdata={}", self.data_dir.display()))
            .arg(format!("--source-server={source}"));
        self.run(command, "pg_rewind", self.config.copy_timeout)
            .await
    }

    async fn reclone(&self, leader: &Upstream) -> Result<(), RejoinError> {
        let new = sibling(&self.data_dir, "rejoin-new");
        let old = sibling(&self.data_dir, "rejoin-old");
        // A left-over from an interrupted re-clone was never the live directory.
        remove_dir(&new)?;
        tracing::info!(member = %self.member, %leader, new = %new.display(), "re-cloning from the leader's database");
        let source = format!(
            "{} user={} connect_timeout=10",
            leader.conninfo(),
            quote_value(&self.config.source_user)
        );
        let mut command = self.tool("pg_basebackup")?;
        command
            .arg("-D")
            .arg(&new)
            .arg(format!("--dbname={source}"))
            .args(["--wal-method=stream", "--checkpoint=fast"]);
        if let Err(e) = self
            .run(command, "pg_basebackup", self.config.copy_timeout)
            .await
        {
            let _ = remove_dir(&new);
            return Err(e);
        }
        // The new copy is complete: only now does the old one leave its place.
        remove_dir(&old)?;
        std::fs::rename(&self.data_dir, &old).map_err(|source| RejoinError::File {
            what: "moving the old data directory aside",
            path: self.data_dir.clone(),
            source,
        })?;
        std::fs::rename(&new, &self.data_dir).map_err(|source| RejoinError::File {
            what: "moving the re-cloned data directory into place",
            path: new.clone(),
            source,
        })?;
        tracing::warn!(member = %self.member, old = %old.display(), "re-cloned; the old data directory is kept");
        Ok(())
    }

    /// `postgresql.auto.conf` (empty when missing) and its path.
    fn read_auto_conf(&self, what: &'static str) -> Result<(PathBuf, String), RejoinError> {
        let path = self.data_dir.join("postgresql.auto.conf");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok((path, text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((path, String::new())),
            Err(source) => Err(RejoinError::File { what, path, source }),
        }
    }

    fn own_settings(&self) -> Result<OwnSettings, RejoinError> {
        let (_, text) = self.read_auto_conf("reading the replication settings")?;
        let settings = auto_conf_settings(&text);
        let get = |k: &str| {
            settings
                .iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        Ok(OwnSettings {
            conninfo: get("primary_conninfo"),
            slot: get("primary_slot_name"),
        })
    }

    fn configure_standby(
        &self,
        leader: Option<&Upstream>,
        own: &OwnSettings,
    ) -> Result<(), RejoinError> {
        let (path, text) = self.read_auto_conf("reading postgresql.auto.conf")?;
        let conninfo = match (leader, own.conninfo.as_deref()) {
            (Some(leader), Some(own)) => {
                repoint_conninfo(own, leader, None).or_else(|| Some(self.fresh_conninfo(leader)))
            }
            (Some(leader), None) => Some(self.fresh_conninfo(leader)),
            (None, own) => own.map(str::to_owned),
        };
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| {
                let key = l.split('=').next().unwrap_or("").trim();
                !matches!(key, "primary_conninfo" | "primary_slot_name")
            })
            .map(str::to_owned)
            .collect();
        if let Some(conninfo) = conninfo {
            lines.push(format!(
                "primary_conninfo = '{}'",
                conninfo.replace('\'', "''")
            ));
        }
        if let Some(slot) = &own.slot {
            lines.push(format!(
                "primary_slot_name = '{}'",
                slot.replace('\'', "''")
            ));
        }
        let mut text = lines.join("\n");
        text.push('\n');
        let tmp = self.data_dir.join("postgresql.auto.conf.rejoin");
        std::fs::write(&tmp, text)
            .and_then(|()| self.give_to_owner(&tmp))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| RejoinError::File {
                what: "writing primary_conninfo",
                path: path.clone(),
                source,
            })?;
        let signal = self.data_dir.join("standby.signal");
        std::fs::write(&signal, "")
            .and_then(|()| self.give_to_owner(&signal))
            .map_err(|source| RejoinError::File {
                what: "writing standby.signal",
                path: signal,
                source,
            })
    }

    /// A `primary_conninfo` for a member that had none (it was the first primary).
    fn fresh_conninfo(&self, leader: &Upstream) -> String {
        let mut conninfo = format!(
            "user={} application_name={} {}",
            quote_value(&self.config.source_user),
            quote_value(&self.member),
            leader.conninfo()
        );
        if let Some(passfile) = &self.config.passfile {
            conninfo.push_str(&format!(
                " passfile={}",
                quote_value(&passfile.display().to_string())
            ));
        }
        conninfo
    }

    /// Gives `path` the data directory's owner and mode 0600.
    fn give_to_owner(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(&self.data_dir)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        if nix::unistd::geteuid().as_raw() != meta.uid() {
            std::os::unix::fs::chown(path, Some(meta.uid()), Some(meta.gid()))?;
        }
        Ok(())
    }

    fn tool(&self, name: &str) -> Result<tokio::process::Command, RejoinError> {
        self.command(&self.config.bin_dir.join(name))
    }

    /// `program` as `run_as`, in the data directory's parent, with the libpq environment
    /// this config sets (and no stray `PGDATA`/`PGPORT`/`PGHOST`).
    fn command(&self, program: &Path) -> Result<tokio::process::Command, RejoinError> {
        let mut command = tokio::process::Command::new(program);
        command
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(parent) = self.data_dir.parent() {
            command.current_dir(parent);
        }
        if let Some(passfile) = &self.config.passfile {
            command.env("PGPASSFILE", passfile);
        }
        if let Some(name) = &self.config.run_as {
            let user = nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| RejoinError::NoUser(name.clone()))?;
            command
                .uid(user.uid.as_raw())
                .gid(user.gid.as_raw())
                .env("HOME", &user.dir)
                .env("USER", name);
        }
        Ok(command)
    }

    async fn output(
        &self,
        mut command: tokio::process::Command,
        what: &'static str,
        limit: Duration,
    ) -> Result<std::process::Output, RejoinError> {
        let program = command
            .as_std()
            .get_program()
            .to_string_lossy()
            .into_owned();
        match tokio::time::timeout(limit, command.output()).await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(e)) => Err(RejoinError::Command {
                what,
                program,
                detail: format!("cannot run it: {e}"),
            }),
            Err(_) => Err(RejoinError::Command {
                what,
                program,
                detail: format!("timed out after {limit:?} (killed)"),
            }),
        }
    }

    async fn run(
        &self,
        command: tokio::process::Command,
        what: &'static str,
        limit: Duration,
    ) -> Result<(), RejoinError> {
        let program = command
            .as_std()
            .get_program()
            .to_string_lossy()
            .into_owned();
        let output = self.output(command, what, limit).await?;
        if output.status.success() {
            tracing::debug!(member = %self.member, what, "done");
            Ok(())
        } else {
            Err(failed(what, &program, &output))
        }
    }
}

fn failed(what: &'static str, program: &str, output: &std::process::Output) -> RejoinError {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    RejoinError::Command {
        what,
        program: program.to_owned(),
        detail: format!("exited with {}: {}", output.status, tail.join(" / ")),
    }
}

/// `<dir>.<suffix>`, beside `dir`.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    dir.with_file_name(name)
}

fn remove_dir(dir: &Path) -> Result<(), RejoinError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RejoinError::File {
            what: "removing a left-over data directory",
            path: dir.to_owned(),
            source,
        }),
    }
}

/// The `key = 'value'` settings of a `postgresql.auto.conf` (values unquoted, `''` and
/// backslash escapes undone); comments and lines that do not parse are skipped.
fn auto_conf_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.starts_with('#') {
                return None;
            }
            let (key, value) = line.split_once('=')?;
            let value = value.trim();
            let value = match value.strip_prefix('\'') {
                Some(rest) => {
                    let mut out = String::new();
                    let mut chars = rest.chars().peekable();
                    loop {
                        match chars.next()? {
                            '\'' if chars.next_if_eq(&'\'').is_some() => out.push('\''),
                            '\'' => break,
                            '\\' => out.push(chars.next()?),
                            c => out.push(c),
                        }
                    }
                    out
                }
                None => value.split_whitespace().next().unwrap_or("").to_owned(),
            };
            Some((key.trim().to_owned(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_conf_values_are_unquoted() {
        let text = "# Do not edit this file manually!\n\
                    primary_conninfo = 'user=postgres passfile=''/var/lib/x'' host=10.0.0.1 port=5432'\n\
                    primary_slot_name = 'node_b'\n\
                    wal_level = replica\n";
        let s = auto_conf_settings(text);
        assert_eq!(
            s[0],
            (
                "primary_conninfo".to_owned(),
                "user=postgres passfile='/var/lib/x' host=10.0.0.1 port=5432".to_owned()
            )
        );
        assert_eq!(s[1].1, "node_b");
        assert_eq!(s[2].1, "replica");
    }

    #[test]
    fn config_rules_name_the_field() {
        RejoinConfig::default().validate().unwrap();
        let c = RejoinConfig {
            enabled: true,
            ..RejoinConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "data_dir");
        let c = RejoinConfig {
            enabled: true,
            data_dir: Some("/var/lib/pg".into()),
            ..RejoinConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "start_command");
        let c = RejoinConfig {
            retry_interval: Duration::ZERO,
            ..RejoinConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "retry_interval");
    }

    #[test]
    fn siblings_sit_beside_the_data_directory() {
        assert_eq!(
            sibling(Path::new("/var/lib/pg/data"), "rejoin-old"),
            PathBuf::from("/var/lib/pg/data.rejoin-old")
        );
    }
}
