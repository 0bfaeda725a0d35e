//! `ha-dr`: encrypted, verified backups from the command line.
//!
//! Every error ends the process with status 1 and one line on stderr saying why, except
//! `wal-fetch`, which speaks PostgreSQL's `restore_command` protocol: 0 fetched, 1 not in
//! the archive (recovery goes on: the WAL ends here), 255 anything else (a file that does
//! not authenticate, an unreadable store, a wrong key, a bad command line): PostgreSQL aborts
//! recovery on a status above 125, where treating the error as the end of the WAL would
//! promote a server that silently lacks the rest.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ha_dr::{
    BackupId, KeyRing, LocalStore, MasterKey, PgTools, PitrRestore, Progress, RecoveryTarget,
    Repository, RestoreTarget, RetentionPolicy, ScratchPostgres, Source, WalStream,
    WalStreamConfig,
};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "ha-dr",
    version,
    about = "Encrypted, compressed, verified backups"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Creates a new master key file (32 random bytes, mode 0600); prints its key id.
    Keygen {
        /// Where to write the key; must not exist.
        #[arg(long)]
        out: PathBuf,
    },
    /// Backs up each source given; prints one backup id per line.
    Backup {
        #[command(flatten)]
        repo: RepoArgs,
        /// A directory tree.
        #[arg(long = "dir", value_name = "PATH")]
        dirs: Vec<PathBuf>,
        /// A PostgreSQL database URL.
        #[arg(long = "pg", value_name = "URL")]
        pgs: Vec<String>,
        /// A file (or `/dev/stdin`).
        #[arg(long = "file", value_name = "PATH")]
        files: Vec<PathBuf>,
        /// A whole PostgreSQL cluster through `pg_basebackup` (a URL of a user with the
        /// REPLICATION attribute), for point-in-time recovery with archived WAL.
        #[arg(long = "pg-base", value_name = "URL")]
        pg_bases: Vec<String>,
        /// Tags for the manifests.
        #[arg(long = "tag", value_name = "T")]
        tags: Vec<String>,
        /// zstd level (0: no compression).
        #[arg(long, default_value_t = ha_dr::DEFAULT_ZSTD_LEVEL)]
        zstd_level: i32,
    },
    /// Lists backups (oldest first) from the clear part of their manifests, without a key: id,
    /// kind, time, stored size and source (tags and the rest are sealed).
    List {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// JSON (one array of manifests) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Verifies one backup, or all: every segment, sizes and SHA-256.
    Verify {
        #[command(flatten)]
        repo: RepoArgs,
        /// The backup (default: all of them).
        #[arg(long)]
        id: Option<String>,
        /// Also restore into a scratch location and check what arrived; reports the RTO.
        #[arg(long)]
        restore_test: bool,
        /// For restore tests of PostgreSQL backups: a server to create a scratch database on.
        #[arg(long, value_name = "URL")]
        scratch_pg: Option<String>,
        /// Instead: prove that the archived WAL from each base backup to the newest segment
        /// is complete (every segment present and verified, timelines consistent).
        #[arg(long, conflicts_with_all = ["id", "restore_test"])]
        chain: bool,
    },
    /// Restores a backup to a path or a new database.
    Restore {
        #[command(flatten)]
        repo: RepoArgs,
        /// The backup.
        #[arg(long, required_unless_present = "pg_base", conflicts_with = "pg_base")]
        id: Option<String>,
        /// A base backup (`backup --pg-base`) to restore as a PostgreSQL data directory at
        /// `--to`, recovering with the archived WAL to the target given.
        #[arg(
            long,
            value_name = "ID",
            conflicts_with = "pg",
            requires = "recovery_target"
        )]
        pg_base: Option<String>,
        /// Recover to this time (RFC 3339, or `2026-01-02 03:04:05.123+00`).
        #[arg(long, group = "recovery_target", value_name = "TIME")]
        target_time: Option<String>,
        /// Recover to this WAL position (`X/Y`).
        #[arg(long, group = "recovery_target", value_name = "LSN")]
        target_lsn: Option<String>,
        /// Recover up to and including this transaction id.
        #[arg(long, group = "recovery_target", value_name = "XID")]
        target_xid: Option<u64>,
        /// Recover every archived commit (the newest timeline to its end).
        #[arg(long, group = "recovery_target")]
        latest: bool,
        /// The target path (a directory for dir backups, a file otherwise).
        #[arg(
            long,
            value_name = "PATH",
            conflicts_with = "pg",
            required_unless_present = "pg"
        )]
        to: Option<PathBuf>,
        /// The target database URL (postgres backups).
        #[arg(long, value_name = "URL")]
        pg: Option<String>,
        /// Replace existing data (a database is backed up first).
        #[arg(long)]
        force: bool,
    },
    /// PostgreSQL's `archive_command`: archives the WAL file at PATH (`%p`); exits 0 only
    /// once it is durable. The same file again succeeds; other content under its name fails.
    WalPush {
        #[command(flatten)]
        repo: RepoArgs,
        /// zstd level (0: no compression).
        #[arg(long, default_value_t = ha_dr::DEFAULT_ZSTD_LEVEL)]
        zstd_level: i32,
        /// zstd worker threads for the segment (0: compress on this process's one thread).
        /// Default: one per core, at most 4 (a 16 MiB segment is 16 jobs of 1 MiB). The
        /// archiver runs one push at a time, so this is what lets archiving keep up with a
        /// server that writes WAL faster than one core compresses it.
        #[arg(long)]
        zstd_workers: Option<u32>,
        /// The file (`%p`).
        path: PathBuf,
    },
    /// PostgreSQL's `restore_command`: writes archived WAL file NAME (`%f`) to PATH (`%p`)
    /// once it verified. Exit 1: not archived; 255: any other error (aborts recovery).
    WalFetch {
        #[command(flatten)]
        repo: RepoArgs,
        /// When the segment is not archived, hand over the newest partial of it that
        /// `wal-stream` archived (zero-padded: recovery ends where it ends). Only for
        /// recovering to the latest commit (`restore --latest` sets it): a standby must
        /// wait for the complete segment instead.
        #[arg(long)]
        partial: bool,
        /// fsync the file before renaming it into place. Not needed for a
        /// `restore_command`: PostgreSQL fsyncs the segments it keeps, and after a crash
        /// fetches them again (pgBackRest's `archive-get` does not fsync either).
        #[arg(long)]
        fsync: bool,
        /// The file's name (`%f`).
        name: String,
        /// Where to write it (`%p`).
        path: PathBuf,
    },
    /// Streams WAL from a server with `pg_receivewal` on a replication slot: every completed
    /// segment is archived as `wal-push` would, and the segment being received is archived
    /// as a streamed partial about every `--partial-interval` while it changes and at once
    /// when the server goes away or on SIGTERM/SIGINT (then it exits). `restore --latest`
    /// uses the newest streamed partial where the complete segment is missing.
    WalStream {
        #[command(flatten)]
        repo: RepoArgs,
        /// The server: a URL or connection string of a role with the REPLICATION attribute,
        /// without a password (PGPASSWORD or PGPASSFILE in the environment give it).
        #[arg(long, value_name = "URL")]
        url: String,
        /// The physical replication slot (created if missing).
        #[arg(long, default_value = "ha_dr_wal_stream")]
        slot: String,
        /// A private directory (0700, created if missing) for pg_receivewal's files.
        #[arg(long, value_name = "DIR")]
        spool: PathBuf,
        /// The least time between two archived snapshots of the segment being received.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        partial_interval: std::time::Duration,
        /// zstd level (0: no compression).
        #[arg(long, default_value_t = ha_dr::DEFAULT_ZSTD_LEVEL)]
        zstd_level: i32,
        /// zstd worker threads per segment, as for `wal-push` (default one per core, at
        /// most 4; 0: this process's one thread).
        #[arg(long)]
        zstd_workers: Option<u32>,
    },
    /// Deletes backups that no keep rule keeps (per source).
    Prune {
        /// The store and the key (prune reads authenticated manifests only).
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Show what would go, and why each kept backup stays; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RepoArgs {
    /// The store directory.
    #[arg(long)]
    store: PathBuf,
    /// The master key file (default: the key in the HA_DR_KEY environment variable).
    #[arg(long, value_name = "KEYFILE")]
    key_file: Option<PathBuf>,
    /// More key files to read older backups with (after a rotation).
    #[arg(long = "read-key-file", value_name = "KEYFILE")]
    read_key_files: Vec<PathBuf>,
    /// Directory of pg_dump / pg_restore (default: PATH).
    #[arg(long, value_name = "DIR")]
    pg_bin: Option<PathBuf>,
}

#[derive(Args)]
struct PolicyArgs {
    /// Keep the n newest.
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest of each of the last n hours with backups.
    #[arg(long, default_value_t = 0)]
    keep_hourly: u32,
    /// … days.
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    /// … ISO weeks.
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    /// … months.
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    /// … years.
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
}

impl RepoArgs {
    /// A `restore_command` running this binary's `wal-fetch` on the same store and keys.
    fn restore_command(&self, partial: bool) -> ha_dr::Result<String> {
        let absolute = |path: &std::path::Path| {
            std::path::absolute(path).map_err(|e| ha_dr::Error::Io {
                action: "resolve",
                path: path.to_path_buf(),
                source: e,
            })
        };
        let exe = std::env::current_exe().map_err(|e| ha_dr::Error::Io {
            action: "find this program",
            path: PathBuf::from("ha-dr"),
            source: e,
        })?;
        let store = absolute(&self.store)?;
        let mut keys = Vec::new();
        if let Some(key) = &self.key_file {
            keys.push(("key-file", absolute(key)?));
        } else {
            eprintln!(
                "ha-dr: warning: the restore_command reads the key from HA_DR_KEY, which must \
                 then be in the environment of the restored PostgreSQL"
            );
        }
        for key in &self.read_key_files {
            keys.push(("read-key-file", absolute(key)?));
        }
        let keys: Vec<(&str, &std::path::Path)> =
            keys.iter().map(|(f, p)| (*f, p.as_path())).collect();
        Ok(ha_dr::wal_fetch_command(&exe, &store, &keys, partial))
    }

    fn tools(&self) -> PgTools {
        PgTools {
            bin_dir: self.pg_bin.clone(),
        }
    }

    fn open(&self) -> ha_dr::Result<Repository> {
        let writer = match &self.key_file {
            Some(path) => MasterKey::load(path)?,
            None => MasterKey::from_env(ha_dr::key::KEY_ENV)?,
        };
        let mut ring = KeyRing::new(writer);
        for path in &self.read_key_files {
            ring = ring.with_reader(MasterKey::load(path)?);
        }
        let repo = Repository::new(LocalStore::open(&self.store)?, ring);
        // A progress bar only for a person watching: never in pipes, logs or CI output.
        Ok(if std::io::stderr().is_terminal() {
            repo.with_progress(Progress::new())
        } else {
            repo
        })
    }
}

/// Runs `work` with a progress bar on stderr fed by the repository's byte counter (none when
/// stderr is not a terminal). `sized`: the backup whose plaintext size is the bar's length,
/// when there is one (its manifest is read only when a bar is drawn).
async fn with_bar<T>(
    repo: &Repository,
    label: String,
    sized: Option<&BackupId>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let Some(progress) = repo.progress() else {
        return work.await;
    };
    let total = match sized {
        Some(id) => repo.manifest(id).await.ok().map(|m| m.plaintext_bytes),
        None => None,
    };
    let bar = match total {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    }
    .with_message(label);
    let start = progress.bytes();
    let ticker = async {
        loop {
            bar.set_position(progress.bytes().saturating_sub(start));
            bar.tick();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let result = tokio::select! {
        result = work => result,
        () = ticker => unreachable!("the ticker never ends"),
    };
    bar.finish_and_clear();
    result
}

/// `wal-fetch`'s status for anything but "not archived": PostgreSQL aborts recovery on a
/// status above 125 instead of taking it for the end of the WAL.
const ABORT_RECOVERY: u8 = 255;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if std::env::args().nth(1).as_deref() == Some("wal-fetch") => {
            let _ = e.print();
            return ExitCode::from(ABORT_RECOVERY);
        }
        Err(e) => e.exit(),
    };
    if let Command::WalFetch {
        repo,
        partial,
        fsync,
        name,
        path,
    } = cli.command
    {
        let options = ha_dr::WalFetchOptions::default()
            .partial(partial)
            .fsync(fsync);
        return wal_fetch(&repo, &name, &path, options);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => fail(&e.to_string()),
    }
}

/// `wal-push`'s and `wal-stream`'s default zstd workers: one per core, at most 4 (a 16 MiB
/// segment is 16 jobs of 1 MiB).
fn wal_push_workers() -> u32 {
    ha_dr::zstd_workers_per_core(4)
}

/// Runs `wal-fetch` with PostgreSQL's exit statuses.
fn wal_fetch(
    repo: &RepoArgs,
    name: &str,
    path: &std::path::Path,
    options: ha_dr::WalFetchOptions,
) -> ExitCode {
    // A store path that is not there is a mistake in the restore_command, not an archive
    // without this file: answering "not archived" would end recovery at the base backup.
    if !repo.store.is_dir() {
        fail(&format!(
            "refusing to hand over {name}: the store {} is not a directory",
            repo.store.display()
        ));
        return ExitCode::from(ABORT_RECOVERY);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            fail(&format!("cannot start the runtime: {e}"));
            return ExitCode::from(ABORT_RECOVERY);
        }
    };
    let result = runtime.block_on(async { repo.open()?.wal_fetch_with(name, path, options).await });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(ha_dr::Error::NotFound { .. }) => {
            // PostgreSQL asks for files that do not exist as a matter of course (the next
            // timeline's history, the segment after the last): one quiet line.
            let _ = writeln!(std::io::stderr(), "ha-dr: {name} is not archived");
            ExitCode::FAILURE
        }
        Err(e) => {
            fail(&format!("refusing to hand over {name}: {e}"));
            ExitCode::from(ABORT_RECOVERY)
        }
    }
}

fn fail(reason: &str) -> ExitCode {
    // One line, whatever the error text holds.
    let line = reason.replace('\n', " ");
    let _ = writeln!(std::io::stderr(), "ha-dr: {line}");
    ExitCode::FAILURE
}

fn out(text: &str) -> ha_dr::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}").map_err(|source| ha_dr::Error::Stream {
        context: "write to stdout".into(),
        source,
    })
}

/// `verify --chain`: one line per base backup; fails if any chain is broken or there is no
/// base backup.
async fn verify_chain(repo: &Repository) -> ha_dr::Result<ExitCode> {
    let results = repo.verify_chain().await?;
    if results.is_empty() {
        return Ok(fail("no base backups in the store: no WAL chain verified"));
    }
    let mut failed = 0;
    for (id, result) in &results {
        match result {
            Ok(r) => out(&format!(
                "ok {id}: WAL {} to {} complete ({} segments, timelines {})",
                r.first,
                r.last,
                r.segments,
                r.timelines
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(" -> ")
            ))?,
            Err(e) => {
                failed += 1;
                out(&format!("FAILED {id}: {e}"))?;
            }
        }
    }
    if failed > 0 {
        return Ok(fail(&format!(
            "{failed} of {} base backups have a broken WAL chain",
            results.len()
        )));
    }
    Ok(ExitCode::SUCCESS)
}

fn json<T: serde::Serialize>(value: &T) -> ha_dr::Result<String> {
    serde_json::to_string_pretty(value).map_err(|e| ha_dr::Error::Task(e.to_string()))
}

async fn run(command: Command) -> ha_dr::Result<ExitCode> {
    match command {
        Command::Keygen { out: path } => {
            let key = MasterKey::keygen(&path)?;
            out(&format!(
                "key id {} written to {}",
                key.id(),
                path.display()
            ))?;
        }
        Command::Backup {
            repo,
            dirs,
            pgs,
            files,
            pg_bases,
            tags,
            zstd_level,
        } => {
            let tools = repo.tools();
            let sources: Vec<Source> = dirs
                .into_iter()
                .map(Source::dir)
                .chain(
                    pgs.into_iter()
                        .map(|url| Source::postgres(url, tools.clone())),
                )
                .chain(files.into_iter().map(Source::file))
                .collect();
            if sources.is_empty() && pg_bases.is_empty() {
                return Err(ha_core::ConfigError::new(
                    "sources",
                    "give at least one --dir, --pg, --pg-base or --file",
                )
                .into());
            }
            let repo = repo.open()?.zstd_level(zstd_level);
            for url in &pg_bases {
                let manifest = with_bar(
                    &repo,
                    "base backup".to_owned(),
                    None,
                    repo.backup_pg_base(url, &tools, &tags),
                )
                .await?;
                out(manifest.id.as_str())?;
            }
            for source in &sources {
                let manifest = with_bar(
                    &repo,
                    format!("backing up {}", source.describe()),
                    None,
                    repo.backup(source, &tags),
                )
                .await?;
                out(manifest.id.as_str())?;
            }
        }
        Command::List {
            store,
            json: as_json,
        } => {
            let store = LocalStore::open(&store)?;
            // Listing reads manifests without a key; any ring will do.
            let repo = Repository::new(store, KeyRing::new(MasterKey::from_bytes([0; 32])));
            let manifests = repo.list().await?;
            if as_json {
                out(&json(&manifests)?)?;
            } else {
                for m in manifests {
                    out(&format!(
                        "{}\t{}\t{}\t{} bytes\t{}",
                        m.id,
                        m.kind,
                        humantime::format_rfc3339_seconds(m.created),
                        m.stored_bytes,
                        m.source,
                    ))?;
                }
            }
        }
        Command::Verify {
            repo,
            id,
            restore_test,
            scratch_pg,
            chain,
        } => {
            if chain {
                return verify_chain(&repo.open()?).await;
            }
            let scratch = scratch_pg.map(|url| ScratchPostgres {
                url,
                tools: repo.tools(),
            });
            let repo = repo.open()?;
            let (ids, unreadable) = match id {
                Some(id) => (vec![BackupId::parse(&id)?], Vec::new()),
                None => {
                    let (manifests, unreadable) = repo.list_authenticated().await?;
                    (manifests.into_iter().map(|m| m.id).collect(), unreadable)
                }
            };
            // A manifest that does not read or authenticate is a backup that cannot be
            // restored: a failure, never skipped.
            let mut failed = unreadable.len();
            for u in &unreadable {
                out(&format!("FAILED {}: {}", u.id, u.reason))?;
            }
            let total = ids.len() + unreadable.len();
            if total == 0 {
                return Ok(fail("no backups in the store: nothing verified"));
            }
            for id in &ids {
                let result = if restore_test {
                    with_bar(
                        &repo,
                        format!("restore-testing {id}"),
                        Some(id),
                        repo.restore_test(id, scratch.as_ref()),
                    )
                    .await
                } else {
                    with_bar(&repo, format!("verifying {id}"), Some(id), repo.verify(id)).await
                };
                match result {
                    Ok(checked) if restore_test => out(&format!(
                        "ok {id} restore test in {:.3}s (measured RTO): {}",
                        checked.duration.as_secs_f64(),
                        checked.detail
                    ))?,
                    Ok(checked) => out(&format!(
                        "ok {id} verified in {:.3}s",
                        checked.duration.as_secs_f64()
                    ))?,
                    Err(e) if total == 1 => return Err(e),
                    Err(e) => {
                        failed += 1;
                        out(&format!("FAILED {id}: {e}"))?;
                    }
                }
            }
            if failed > 0 {
                return Ok(fail(&format!(
                    "{failed} of {total} backups failed verification"
                )));
            }
        }
        Command::Restore {
            repo,
            id,
            pg_base,
            target_time,
            target_lsn,
            target_xid,
            latest,
            to,
            pg,
            force,
        } => {
            if let Some(base) = pg_base {
                let target = match (target_time, target_lsn, target_xid, latest) {
                    (Some(t), None, None, false) => RecoveryTarget::parse_time(&t)?,
                    (None, Some(l), None, false) => RecoveryTarget::Lsn(l.parse()?),
                    (None, None, Some(x), false) => RecoveryTarget::Xid(x),
                    (None, None, None, true) => RecoveryTarget::Latest,
                    _ => {
                        return Err(ha_core::ConfigError::new(
                            "recovery target",
                            "give one of --target-time, --target-lsn, --target-xid, --latest",
                        )
                        .into());
                    }
                };
                let to = to.ok_or_else(|| {
                    ha_core::ConfigError::new("to", "give the new data directory with --to")
                })?;
                if force {
                    return Err(ha_dr::Error::Unsupported(
                        "--force with --pg-base: a data directory is only restored into an \
                         absent or empty directory"
                            .into(),
                    ));
                }
                // Only a recovery to the end of the WAL may end inside a streamed partial.
                let partial = target == RecoveryTarget::Latest;
                let recovery = PitrRestore {
                    target,
                    restore_command: repo.restore_command(partial)?,
                };
                let repo = repo.open()?;
                let base = BackupId::parse(&base)?;
                let checked = with_bar(
                    &repo,
                    format!("restoring {base}"),
                    Some(&base),
                    repo.restore_pg_base(&base, &to, &recovery),
                )
                .await?;
                out(&format!(
                    "restored {base} to {} in {:.3}s: {}; start PostgreSQL on it to recover",
                    to.display(),
                    checked.duration.as_secs_f64(),
                    checked.detail
                ))?;
                return Ok(ExitCode::SUCCESS);
            }
            let id = id.ok_or_else(|| ha_core::ConfigError::new("id", "give --id"))?;
            let target = match (to, pg) {
                (Some(path), None) => RestoreTarget::Path(path),
                (None, Some(url)) => RestoreTarget::Postgres {
                    url,
                    tools: repo.tools(),
                },
                _ => {
                    return Err(ha_core::ConfigError::new("target", "give --to or --pg").into());
                }
            };
            let repo = repo.open()?;
            let backup = BackupId::parse(&id)?;
            let checked = with_bar(
                &repo,
                format!("restoring {id}"),
                Some(&backup),
                repo.restore(&backup, &target, force),
            )
            .await?;
            out(&format!(
                "restored {id} in {:.3}s",
                checked.duration.as_secs_f64()
            ))?;
        }
        Command::WalPush {
            repo,
            zstd_level,
            zstd_workers,
            path,
        } => {
            let workers = zstd_workers.unwrap_or_else(wal_push_workers);
            let repo = repo.open()?.zstd_level(zstd_level).zstd_workers(workers);
            repo.wal_push(&path).await?;
        }
        Command::WalStream {
            repo,
            url,
            slot,
            spool,
            partial_interval,
            zstd_level,
            zstd_workers,
        } => {
            // A daemon: its state changes go to stderr (RUST_LOG, default info).
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .try_init();
            let tools = repo.tools();
            let workers = zstd_workers.unwrap_or_else(wal_push_workers);
            let repo = repo.open()?.zstd_level(zstd_level).zstd_workers(workers);
            let mut config = WalStreamConfig::new(url, slot, spool);
            config.tools = tools;
            config.partial_interval = partial_interval;
            let stream = WalStream::new(repo, config)?;
            let shutdown = tokio_util::sync::CancellationToken::new();
            let on_signal = shutdown.clone();
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .map_err(|e| ha_dr::Error::Task(format!("cannot handle SIGTERM: {e}")))?;
            tokio::spawn(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                on_signal.cancel();
            });
            stream.run(shutdown).await?;
        }
        Command::WalFetch { .. } => {
            return Err(ha_dr::Error::Task("wal-fetch runs outside run()".into()));
        }
        Command::Prune {
            repo,
            policy,
            dry_run,
            json: as_json,
        } => {
            let policy = RetentionPolicy {
                keep_last: policy.keep_last,
                keep_hourly: policy.keep_hourly,
                keep_daily: policy.keep_daily,
                keep_weekly: policy.keep_weekly,
                keep_monthly: policy.keep_monthly,
                keep_yearly: policy.keep_yearly,
            };
            ha_core::config::Validate::validate(&policy)?;
            // Prune acts on authenticated manifests only, so it needs the key.
            let repo = repo.open()?;
            let report = repo.prune(&policy, dry_run).await?;
            if !as_json && !report.wal_removed.is_empty() {
                let verb = if dry_run { "would remove" } else { "removed" };
                out(&format!(
                    "archived WAL: {verb} {} files no kept base backup needs ({} .. {})",
                    report.wal_removed.len(),
                    report.wal_removed[0],
                    report.wal_removed[report.wal_removed.len() - 1]
                ))?;
            }
            for u in &report.unreadable {
                eprintln!(
                    "ha-dr: warning: left alone, manifest not accepted: {}: {}",
                    u.id, u.reason
                );
            }
            if as_json {
                out(&json(&report)?)?;
            } else {
                for group in &report.groups {
                    out(&format!("{} {}", group.kind, group.source))?;
                    for d in &group.decisions {
                        let verdict = match (d.keep, dry_run) {
                            (true, _) => format!("keep   ({})", d.reasons.join(", ")),
                            (false, true) => "would remove".to_owned(),
                            (false, false) => "removed".to_owned(),
                        };
                        out(&format!(
                            "  {}  {}  {verdict}",
                            d.id,
                            humantime::format_rfc3339_seconds(d.created)
                        ))?;
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
