//! [`Repository`]: backup, list, verify, restore, restore-test and prune over one store and
//! key ring.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ha_core::{EventBus, HaEvent, NodeId};
use serde::Serialize;

use crate::error::{Error, Result, from_io};
use crate::format::BackupId;
use crate::key::{KeyRing, random_array};
use crate::manifest::{BackupKind, Details, Listing, Manifest};
use crate::pg::{self, PgTools};
use crate::pipeline::{BackupReader, Compress, copy_large, read_ahead, write_object};
use crate::progress::Progress;
use crate::retention::{self, Decision, RetentionPolicy};
use crate::source::{self, Source};
use crate::staging::{self, Placement, Staging};
use crate::store::{BackupStore, sync_dir};

/// The default zstd level.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Where to restore a backup to.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum RestoreTarget {
    /// A path: a directory for `dir` backups (created; it must be absent or empty unless
    /// `force`), a file for the other kinds (for `postgres`, the `pg_dump -Fc` archive).
    Path(PathBuf),
    /// A database, created by the restore (`postgres` backups only). The URL names it.
    Postgres {
        /// `postgresql://user@host:port/database`.
        url: String,
        /// Where `pg_restore` is.
        tools: PgTools,
    },
}

/// Where `verify --restore-test` may restore a `postgres` backup to: a server on which a
/// scratch database is created and dropped.
#[derive(Clone, Debug)]
pub struct ScratchPostgres {
    /// Any database URL on the scratch server (its database part is replaced).
    pub url: String,
    /// Where `pg_restore` is.
    pub tools: PgTools,
}

/// The outcome of a verify or restore.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Checked {
    /// The authenticated manifest of the backup.
    pub manifest: Manifest,
    /// How long the operation took (for a restore or restore test: the measured RTO).
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// What was compared beyond the stream checks (restore tests), in words.
    pub detail: String,
}

/// The outcome of a prune.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct PruneReport {
    /// Every backup, grouped by source, with whether and why it is kept.
    pub groups: Vec<PruneGroup>,
    /// The backups removed (empty on a dry run).
    pub removed: Vec<BackupId>,
    /// Backups whose manifest did not authenticate with this key ring: neither counted nor
    /// removed.
    pub unreadable: Vec<Unreadable>,
    /// Archived WAL files removed (or, on a dry run, that would be) because no kept base
    /// backup needs them.
    pub wal_removed: Vec<BackupId>,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// Retention decisions for the backups of one source.
#[derive(Clone, Debug, Serialize)]
pub struct PruneGroup {
    /// The backup kind.
    pub kind: BackupKind,
    /// The source description.
    pub source: String,
    /// Decisions, newest first.
    pub decisions: Vec<Decision>,
}

/// Backups of any source, in one store, with one key ring.
///
/// Methods are `async`; the streaming work runs on `tokio`'s blocking threads. Events
/// ([`HaEvent::BackupCompleted`], [`HaEvent::BackupFailed`], [`HaEvent::RestoreCompleted`])
/// go to the bus given with [`events`](Self::events).
///
/// ```no_run
/// # async fn demo() -> ha_dr::Result<()> {
/// use ha_dr::{KeyRing, LocalStore, MasterKey, Repository, RestoreTarget, Source};
///
/// let key = MasterKey::load("/etc/ha/backup.key".as_ref())?;
/// let repo = Repository::new(LocalStore::open("/var/backups/ha")?, KeyRing::new(key));
/// let manifest = repo.backup(&Source::dir("/srv/data"), &[]).await?;
/// repo.verify(&manifest.id).await?;
/// repo.restore(&manifest.id, &RestoreTarget::Path("/srv/data-restored".into()), false).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Repository {
    pub(crate) store: Arc<dyn BackupStore>,
    pub(crate) keys: KeyRing,
    pub(crate) compress: Compress,
    events: Option<(EventBus, NodeId)>,
    pub(crate) progress: Option<Progress>,
    /// The newest backup of each source (kind, description) this repository has verified:
    /// prune never deletes it.
    verified: Arc<std::sync::Mutex<VerifiedBySource>>,
    /// Tests: the restored database fails to take the target's place.
    #[cfg(test)]
    fail_swap: bool,
}

/// Per source (kind, description): when the newest verified backup was made, and its id.
type VerifiedBySource = BTreeMap<(BackupKind, String), (SystemTime, BackupId)>;

/// A backup whose manifest could not be read or authenticated: prune leaves it alone,
/// `verify` of every backup counts it as a failure.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Unreadable {
    /// The backup.
    pub id: BackupId,
    /// Why its manifest was not accepted.
    pub reason: String,
}

/// zstd worker threads: one per core, at most `at_most`; 0 (compress on the calling thread)
/// on a single core. What [`Repository::new`] starts with (no cap) and `ha-dr wal-push`'s
/// default (at most 4).
pub fn zstd_workers_per_core(at_most: u32) -> u32 {
    match std::thread::available_parallelism().map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX)) {
        Ok(cores) if cores > 1 => cores.min(at_most),
        _ => 0,
    }
}

impl Repository {
    /// A repository over `store`, writing with the ring's writer key. Compression: zstd
    /// level 3 on as many threads as the machine has cores.
    pub fn new(store: impl BackupStore, keys: KeyRing) -> Self {
        Self::with_store(Arc::new(store), keys)
    }

    /// As [`new`](Self::new), with a shared store.
    pub fn with_store(store: Arc<dyn BackupStore>, keys: KeyRing) -> Self {
        Self {
            store,
            keys,
            compress: Compress {
                level: DEFAULT_ZSTD_LEVEL,
                workers: zstd_workers_per_core(u32::MAX),
            },
            events: None,
            progress: None,
            verified: Arc::default(),
            #[cfg(test)]
            fail_swap: false,
        }
    }

    /// The byte counter set with [`with_progress`](Self::with_progress), if any.
    pub fn progress(&self) -> Option<&Progress> {
        self.progress.as_ref()
    }

    /// Counts the plaintext bytes every operation of this repository writes or reads into
    /// `progress` (the CLI's progress bar reads it).
    #[must_use]
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = Some(progress);
        self
    }

    /// The zstd level (1..=22; 0 stores uncompressed). Default 3.
    #[must_use]
    pub fn zstd_level(mut self, level: i32) -> Self {
        self.compress.level = level.clamp(0, 22);
        self
    }

    /// zstd worker threads (0: compress on the backup's own thread). Default: one per core
    /// when there are several.
    #[must_use]
    pub fn zstd_workers(mut self, workers: u32) -> Self {
        self.compress.workers = workers;
        self
    }

    /// Publishes backup and restore events on `bus` as `node`.
    #[must_use]
    pub fn events(mut self, bus: EventBus, node: NodeId) -> Self {
        self.events = Some((bus, node));
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn BackupStore> {
        &self.store
    }

    /// The key ring.
    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    pub(crate) fn publish(&self, event: impl FnOnce(SystemTime, NodeId) -> HaEvent) {
        if let Some((bus, node)) = &self.events {
            bus.publish(event(SystemTime::now(), node.clone()));
        }
    }

    pub(crate) async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| Error::Task(e.to_string()))?
    }

    /// Backs `source` up; returns the manifest once data and manifest are durable.
    pub async fn backup(&self, source: &Source, tags: &[String]) -> Result<Manifest> {
        self.backup_observed(source, tags, true).await
    }

    /// [`backup`](Self::backup), with metrics and logs; events only if `publish` (the
    /// scheduler publishes its own, once per scheduled run rather than per attempt).
    pub(crate) async fn backup_observed(
        &self,
        source: &Source,
        tags: &[String],
        publish: bool,
    ) -> Result<Manifest> {
        let kind = source.kind();
        let result = self.backup_inner(source, tags).await;
        match &result {
            Ok(m) => {
                metrics::counter!(ha_core::metric::BACKUPS_TOTAL, "kind" => kind.as_str(), "outcome" => "success").increment(1);
                metrics::histogram!(ha_core::metric::BACKUP_DURATION_SECONDS, "kind" => kind.as_str()).record(m.duration.as_secs_f64());
                metrics::gauge!(ha_core::metric::BACKUP_SIZE_BYTES, "kind" => kind.as_str())
                    .set(m.stored_bytes as f64);
                tracing::info!(backup_id = %m.id, kind = %kind, bytes = m.stored_bytes, duration = ?m.duration, "backup completed");
                if !publish {
                    return result;
                }
                self.publish(|at, node| HaEvent::BackupCompleted {
                    at,
                    node,
                    backup_id: m.id.to_string(),
                    kind: kind.as_str().to_owned(),
                    bytes: m.stored_bytes,
                    duration: m.duration,
                });
            }
            Err(e) => {
                metrics::counter!(ha_core::metric::BACKUPS_TOTAL, "kind" => kind.as_str(), "outcome" => "failure").increment(1);
                tracing::warn!(kind = %kind, error = %e, "backup failed");
                if !publish {
                    return result;
                }
                self.publish(|at, node| HaEvent::BackupFailed {
                    at,
                    node,
                    kind: kind.as_str().to_owned(),
                    reason: e.to_string(),
                });
            }
        }
        result
    }

    async fn backup_inner(&self, source: &Source, tags: &[String]) -> Result<Manifest> {
        if let Source::PgBase { url, tools } = source {
            return crate::pitr::base_backup(self, url, tools, tags).await;
        }
        let kind = source.kind();
        let id = BackupId::generate(kind.as_str(), SystemTime::now())?;
        let snapshot = match source {
            Source::Postgres { url, .. } => Some(pg::Snapshot::take(url).await?),
            _ => None,
        };
        let snapshot_info = snapshot
            .as_ref()
            .map(|s| (s.name.clone(), s.table_rows.clone()));
        let store = Arc::clone(&self.store);
        let key = self.keys.writer().clone();
        let progress = self.progress.clone();
        let compress = self.compress;
        let task_source = source.clone();
        let (description, tags) = (source.describe(), tags.to_vec());
        let written = Self::blocking(move || {
            write_object(
                &*store,
                &key,
                compress,
                progress,
                &id,
                kind,
                description,
                tags,
                |writer| {
                    Ok(match &task_source {
                        Source::Dir(path) => source::write_dir(path, store.local_dir(), writer)?,
                        Source::File(path) => source::write_file(path, writer)?,
                        Source::Config(config) => source::write_config(config, writer)?,
                        Source::Postgres { url, tools } => {
                            let (name, table_rows) = snapshot_info.unwrap_or_default();
                            let mut child = pg::spawn_dump(tools, url, &name)?;
                            let stdout = child.child_mut().and_then(|c| c.stdout.take());
                            if let Some(mut stdout) = stdout {
                                copy_large(&mut stdout, writer)
                                    .map_err(|e| from_io(e, || "stream pg_dump output".into()))?;
                            }
                            child.wait()?;
                            Details::Postgres { table_rows }
                        }
                        Source::PgBase { .. } => {
                            return Err(Error::Task("base backups are taken by pitr".into()));
                        }
                    })
                },
            )
        })
        .await;
        if let Some(snapshot) = snapshot {
            snapshot.close().await;
        }
        written
    }

    /// Every backup's listing (the clear part of its manifest: id, kind, source, time,
    /// stored size, key id), oldest first, read without authentication (no key is needed to
    /// list); manifests that cannot be read are skipped with a warning. The rest of a
    /// manifest is sealed: [`list_authenticated`](Self::list_authenticated) opens it.
    pub async fn list(&self) -> Result<Vec<Listing>> {
        let store = Arc::clone(&self.store);
        Self::blocking(move || {
            let mut out = Vec::new();
            for id in store.list()? {
                let read = store
                    .get_manifest(&id)
                    .and_then(|bytes| Manifest::read_listing(&bytes, &id));
                match read {
                    Ok(m) => out.push(m),
                    Err(e) => {
                        tracing::warn!(backup_id = %id, error = %e, "unreadable manifest skipped")
                    }
                }
            }
            out.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
            Ok(out)
        })
        .await
    }

    /// Every backup's manifest, authenticated with the key ring, oldest first; and the
    /// backups whose manifest did not read or authenticate.
    pub async fn list_authenticated(&self) -> Result<(Vec<Manifest>, Vec<Unreadable>)> {
        let (store, keys) = (Arc::clone(&self.store), self.keys.clone());
        Self::blocking(move || {
            let mut out = Vec::new();
            let mut unreadable = Vec::new();
            for id in store.list()? {
                match store
                    .get_manifest(&id)
                    .and_then(|bytes| Manifest::open(&bytes, &id, &keys))
                {
                    Ok(m) => out.push(m),
                    Err(e) => {
                        tracing::warn!(backup_id = %id, error = %e, "manifest not accepted");
                        unreadable.push(Unreadable {
                            id,
                            reason: e.to_string(),
                        });
                    }
                }
            }
            out.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
            Ok((out, unreadable))
        })
        .await
    }

    fn note_verified(&self, manifest: &Manifest) {
        let mut verified = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = verified
            .entry((manifest.kind, manifest.source.clone()))
            .or_insert((manifest.created, manifest.id.clone()));
        if entry.0 <= manifest.created {
            *entry = (manifest.created, manifest.id.clone());
        }
    }

    /// The authenticated manifest of `id`.
    pub async fn manifest(&self, id: &BackupId) -> Result<Manifest> {
        let (store, keys, id) = (Arc::clone(&self.store), self.keys.clone(), id.clone());
        Self::blocking(move || Manifest::open(&store.get_manifest(&id)?, &id, &keys)).await
    }

    /// Reads every segment of `id`: checks every tag, the final-segment flag, the stored and
    /// plaintext sizes and the SHA-256.
    pub async fn verify(&self, id: &BackupId) -> Result<Checked> {
        let clock = Instant::now();
        let (store, keys, id) = (Arc::clone(&self.store), self.keys.clone(), id.clone());
        let progress = self.progress.clone();
        let (manifest, structure) = Self::blocking(move || {
            let mut reader = BackupReader::open(&*store, &keys, &id)?.with_progress(progress);
            let manifest = reader.manifest().clone();
            let structure = read_ahead(&mut reader, |plain| check_structure(&manifest, plain))?;
            reader.drain()?;
            Ok((reader.manifest().clone(), structure))
        })
        .await?;
        self.note_verified(&manifest);
        Ok(Checked {
            manifest,
            duration: clock.elapsed(),
            detail: format!("every segment, the sizes and the SHA-256 check out; {structure}"),
        })
    }

    /// Restores `id` to `target`, verifying as it streams. Nothing appears at the target
    /// unless the whole backup verified: directories and files are written beside the target
    /// and renamed into place; databases are restored into a temporary database and renamed.
    /// Refuses a target holding data unless `force`; a database restored over with `force`
    /// is first backed up itself (tag `pre-restore-safety`).
    pub async fn restore(
        &self,
        id: &BackupId,
        target: &RestoreTarget,
        force: bool,
    ) -> Result<Checked> {
        let clock = Instant::now();
        let manifest = match target {
            RestoreTarget::Path(path) => {
                let (store, keys, id) = (Arc::clone(&self.store), self.keys.clone(), id.clone());
                let progress = self.progress.clone();
                let path = path.clone();
                Self::blocking(move || {
                    let mut reader =
                        BackupReader::open(&*store, &keys, &id)?.with_progress(progress);
                    restore_to_path(&mut reader, &path, force)?;
                    Ok(reader.manifest().clone())
                })
                .await?
            }
            RestoreTarget::Postgres { url, tools } => {
                self.restore_database(id, url, tools, force).await?
            }
        };
        let duration = clock.elapsed();
        self.restored(&manifest, duration, true);
        Ok(Checked {
            manifest,
            duration,
            detail: "restored".into(),
        })
    }

    pub(crate) fn restored(&self, manifest: &Manifest, duration: Duration, publish: bool) {
        metrics::histogram!(ha_core::metric::RESTORE_DURATION_SECONDS, "kind" => manifest.kind.as_str())
            .record(duration.as_secs_f64());
        tracing::info!(backup_id = %manifest.id, duration = ?duration, "restore completed");
        if !publish {
            return;
        }
        self.publish(|at, node| HaEvent::RestoreCompleted {
            at,
            node,
            backup_id: manifest.id.to_string(),
            duration,
        });
    }

    async fn restore_database(
        &self,
        id: &BackupId,
        url: &str,
        tools: &PgTools,
        force: bool,
    ) -> Result<Manifest> {
        let manifest = self.manifest(id).await?;
        if manifest.kind != BackupKind::Postgres {
            return Err(Error::Unsupported(format!(
                "backup {id} is a {} backup; only postgres backups restore into a database",
                manifest.kind
            )));
        }
        let run_start = SystemTime::now();
        let target = pg::database_of(url)?;
        let mut admin = pg::admin(url).await?;
        clean_temp_databases(&mut admin, run_start).await?;
        let exists = pg::database_exists(&mut admin, &target).await?;
        if exists && !force {
            return Err(Error::TargetNotEmpty {
                target: pg::redact(url),
                reason: format!("database {target} exists"),
            });
        }
        let temp = temp_database_name(&target, TempDb::Restore, run_start)?;
        // Held on `admin` until the restore ends: no other run's cleanup drops it meanwhile.
        lock_temp_database(&mut admin, &temp).await?;
        self.restore_into_new_database(id, url, &temp, tools)
            .await?;
        // The name the replaced database is renamed to, if there is one.
        let aside = if exists {
            Some(temp_database_name(&target, TempDb::Old, run_start)?)
        } else {
            None
        };
        if let Err(e) = self
            .swap_in(&mut admin, url, tools, &target, &temp, aside.as_deref())
            .await
        {
            let drop_temp = format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                pg::quote_ident(&temp)
            );
            let _ = pg::execute(&mut admin, &drop_temp).await;
            return Err(e);
        }
        Ok(manifest)
    }

    /// Puts the restored database `temp` in the place of `target`. If `target` exists
    /// (`aside` names where it goes), it is first backed up (and that backup verified), then renamed aside, not dropped: if
    /// the restored one cannot take its place, it is renamed back. At every step one
    /// complete copy exists under a known name.
    async fn swap_in(
        &self,
        admin: &mut sqlx::PgConnection,
        url: &str,
        tools: &PgTools,
        target: &str,
        temp: &str,
        aside: Option<&str>,
    ) -> Result<()> {
        let rename = |from: &str, to: &str| {
            format!(
                "ALTER DATABASE {} RENAME TO {}",
                pg::quote_ident(from),
                pg::quote_ident(to)
            )
        };
        let Some(aside) = aside else {
            return pg::execute(admin, &rename(temp, target)).await;
        };
        let safety = self
            .backup(
                &Source::postgres(url, tools.clone()),
                &["pre-restore-safety".to_owned()],
            )
            .await?;
        self.verify(&safety.id).await?;
        tracing::info!(backup_id = %safety.id, database = %target, "verified safety backup taken before restoring over it");
        lock_temp_database(admin, aside).await?;
        // A database with sessions cannot be renamed: end them (as DROP ... WITH (FORCE)
        // did before).
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(target)
        .execute(&mut *admin)
        .await
        .map_err(|source| Error::Postgres {
            context: format!("end the sessions of database {target}"),
            source,
        })?;
        pg::execute(admin, &rename(target, aside)).await?;
        #[cfg(test)]
        let swapped = if self.fail_swap {
            Err(Error::Postgres {
                context: "swap in the restored database".into(),
                source: sqlx::Error::Protocol("injected failure".into()),
            })
        } else {
            pg::execute(admin, &rename(temp, target)).await
        };
        #[cfg(not(test))]
        let swapped = pg::execute(admin, &rename(temp, target)).await;
        if let Err(e) = swapped {
            return match pg::execute(admin, &rename(aside, target)).await {
                Ok(()) => Err(e),
                Err(back) => Err(Error::Postgres {
                    context: format!(
                        "{e}; and the old database could not be renamed back: it is intact \
                         as {aside}, and backed up as {}",
                        safety.id
                    ),
                    source: match back {
                        Error::Postgres { source, .. } => source,
                        other => sqlx::Error::Protocol(other.to_string()),
                    },
                }),
            };
        }
        let drop_aside = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            pg::quote_ident(aside)
        );
        if let Err(e) = pg::execute(admin, &drop_aside).await {
            tracing::warn!(database = %aside, error = %e, "the replaced database could not be dropped");
        }
        Ok(())
    }

    /// Creates database `name` on `url`'s server and restores `id` into it; drops it again on
    /// any error.
    async fn restore_into_new_database(
        &self,
        id: &BackupId,
        url: &str,
        name: &str,
        tools: &PgTools,
    ) -> Result<()> {
        let mut admin = pg::admin(url).await?;
        let quoted = pg::quote_ident(name);
        pg::execute(
            &mut admin,
            &format!("CREATE DATABASE {quoted} TEMPLATE template0"),
        )
        .await?;
        let (store, keys, id) = (Arc::clone(&self.store), self.keys.clone(), id.clone());
        let progress = self.progress.clone();
        let db_url = pg::with_database(url, name)?;
        let tools = tools.clone();
        let result = Self::blocking(move || {
            let mut reader = BackupReader::open(&*store, &keys, &id)?.with_progress(progress);
            let mut child = pg::spawn_restore(&tools, &db_url)?;
            let stdin = child.child_mut().and_then(|c| c.stdin.take());
            pipe_verified(&mut reader, stdin)?;
            child.wait()
        })
        .await;
        if result.is_err() {
            let _ = pg::execute(
                &mut admin,
                &format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"),
            )
            .await;
        }
        result
    }

    /// Verifies `id`, then restores it into a scratch location and checks what arrived:
    /// the entry count of a directory, the row count of every table of a database (in a
    /// scratch database on `scratch_pg`, dropped afterwards). The duration is the measured
    /// RTO.
    pub async fn restore_test(
        &self,
        id: &BackupId,
        scratch_pg: Option<&ScratchPostgres>,
    ) -> Result<Checked> {
        self.restore_test_observed(id, scratch_pg, true).await
    }

    pub(crate) async fn restore_test_observed(
        &self,
        id: &BackupId,
        scratch_pg: Option<&ScratchPostgres>,
        publish: bool,
    ) -> Result<Checked> {
        let clock = Instant::now();
        let manifest = self.manifest(id).await?;
        let detail = match manifest.kind {
            BackupKind::Postgres => {
                let scratch = scratch_pg.ok_or_else(|| {
                    Error::Unsupported(format!(
                        "a restore test of postgres backup {id} needs a scratch server (scratch_pg)"
                    ))
                })?;
                let run_start = SystemTime::now();
                let mut admin = pg::admin(&scratch.url).await?;
                clean_temp_databases(&mut admin, run_start).await?;
                let name = temp_database_name("verify", TempDb::Test, run_start)?;
                lock_temp_database(&mut admin, &name).await?;
                self.restore_into_new_database(id, &scratch.url, &name, &scratch.tools)
                    .await?;
                let counted = async {
                    let mut conn = pg::connect(&pg::with_database(&scratch.url, &name)?).await?;
                    let rows = pg::table_rows(&mut conn).await;
                    let _ = sqlx::Connection::close(conn).await;
                    rows
                }
                .await;
                let _ = pg::execute(
                    &mut admin,
                    &format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        pg::quote_ident(&name)
                    ),
                )
                .await;
                let counted = counted?;
                let expected = match &manifest.details {
                    Details::Postgres { table_rows } => table_rows.clone(),
                    _ => BTreeMap::new(),
                };
                if counted != expected {
                    return Err(Error::corrupt(
                        id.as_str(),
                        format!(
                            "restored row counts {counted:?} differ from the dumped ones {expected:?}"
                        ),
                    ));
                }
                format!("{} tables, row counts match", counted.len())
            }
            _ => {
                let (store, keys, id2) = (Arc::clone(&self.store), self.keys.clone(), id.clone());
                let progress = self.progress.clone();
                let expected = match &manifest.details {
                    Details::Dir { entries, .. } | Details::PgBase { entries, .. } => {
                        Some(*entries)
                    }
                    _ => None,
                };
                Self::blocking(move || {
                    // A private, locked directory under the system temp dir, removed on drop
                    // (never committed); the scratch directories of crashed restore tests
                    // there are removed as crashed restores' staging is.
                    let scratch = Staging::create(
                        &std::env::temp_dir().join("ha-dr-restore-test"),
                        true,
                        Placement::Beside,
                        SystemTime::now(),
                    )?;
                    let mut reader =
                        BackupReader::open(&*store, &keys, &id2)?.with_progress(progress);
                    let target = scratch.path().join("restored");
                    let entries = restore_to_path(&mut reader, &target, false)?;
                    match (expected, entries) {
                        (Some(want), Some(got)) if want != got => Err(Error::corrupt(
                            id2.as_str(),
                            format!("restored {got} entries, the backup recorded {want}"),
                        )),
                        (_, Some(got)) => Ok(format!("{got} entries restored")),
                        _ => Ok(format!(
                            "{} bytes restored",
                            reader.manifest().plaintext_bytes
                        )),
                    }
                })
                .await?
            }
        };
        let duration = clock.elapsed();
        self.note_verified(&manifest);
        self.restored(&manifest, duration, publish);
        Ok(Checked {
            manifest,
            duration,
            detail,
        })
    }

    /// Applies `policy` to the backups of each source (grouped by kind and source
    /// description) and, unless `dry_run`, deletes those it does not keep. Also removes
    /// leftovers of crashed backups older than a day.
    pub async fn prune(&self, policy: &RetentionPolicy, dry_run: bool) -> Result<PruneReport> {
        self.prune_where(policy, dry_run, |_| true).await
    }

    /// [`prune`](Self::prune), applied to the backups of `source` only (those whose manifest
    /// has its kind and description); the backups of other sources are left alone.
    pub async fn prune_source(
        &self,
        policy: &RetentionPolicy,
        source: &Source,
        dry_run: bool,
    ) -> Result<PruneReport> {
        let (kind, described) = (source.kind(), source.describe());
        self.prune_where(policy, dry_run, |m| m.kind == kind && m.source == described)
            .await
    }

    async fn prune_where(
        &self,
        policy: &RetentionPolicy,
        dry_run: bool,
        include: impl Fn(&Manifest) -> bool,
    ) -> Result<PruneReport> {
        // Only authenticated manifests count: a forged one could otherwise pose as the
        // newest backup and have the real ones removed.
        let (mut manifests, unreadable) = self.list_authenticated().await?;
        let (bases, wal): (Vec<Manifest>, Vec<Manifest>) = manifests
            .iter()
            .filter(|m| matches!(m.kind, BackupKind::PgBase | BackupKind::Wal))
            .cloned()
            .partition(|m| m.kind == BackupKind::PgBase);
        // Archived WAL is not a backup of its own: calendar buckets would delete segments a
        // kept base backup needs. It goes when no kept base backup needs it (below).
        manifests.retain(|m| m.kind != BackupKind::Wal && include(m));
        let prunes_bases = manifests.iter().any(|m| m.kind == BackupKind::PgBase);
        let mut groups: BTreeMap<(BackupKind, String), Vec<Manifest>> = BTreeMap::new();
        for m in manifests {
            groups
                .entry((m.kind, m.source.clone()))
                .or_default()
                .push(m);
        }
        let mut out = Vec::new();
        for ((kind, source), members) in groups {
            let backups: Vec<(BackupId, SystemTime)> =
                members.iter().map(|m| (m.id.clone(), m.created)).collect();
            let mut decisions = retention::apply(policy, &backups);
            let deletes = decisions.iter().any(|d| !d.keep);
            if deletes && let Some(protect) = self.newest_verified(kind, &source, &members).await {
                for d in &mut decisions {
                    if d.id == protect {
                        d.keep = true;
                        d.reasons.push("newest verified");
                    }
                }
            }
            out.push(PruneGroup {
                kind,
                source,
                decisions,
            });
        }
        let groups = out;
        let doomed: Vec<BackupId> = groups
            .iter()
            .flat_map(|g| g.decisions.iter().filter(|d| !d.keep).map(|d| d.id.clone()))
            .collect();
        let wal_doomed = if prunes_bases {
            let kept: Vec<Manifest> = bases
                .into_iter()
                .filter(|m| !doomed.contains(&m.id))
                .collect();
            crate::pitr::wal_not_needed(&kept, &wal)?
        } else {
            Vec::new()
        };
        let (removed, wal_removed) = if dry_run {
            (Vec::new(), wal_doomed)
        } else {
            let store = Arc::clone(&self.store);
            Self::blocking(move || {
                // Base backups first: WAL goes only once nothing that needs it remains.
                for id in doomed.iter().chain(&wal_doomed) {
                    store.delete(id)?;
                }
                store.cleanup(Duration::from_secs(24 * 3600))?;
                Ok((doomed, wal_doomed))
            })
            .await?
        };
        if !wal_removed.is_empty() {
            tracing::info!(
                files = wal_removed.len(),
                dry_run,
                "archived WAL no kept base backup needs pruned"
            );
        }
        Ok(PruneReport {
            groups,
            removed,
            wal_removed,
            unreadable,
            dry_run,
        })
    }

    /// The newest backup of a source known to verify: the newest this repository verified,
    /// or else the newest of `members` that verifies now (checked newest first). `None` if
    /// none does.
    async fn newest_verified(
        &self,
        kind: BackupKind,
        source: &str,
        members: &[Manifest],
    ) -> Option<BackupId> {
        let known = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(kind, source.to_owned()))
            .map(|(_, id)| id.clone());
        if let Some(id) = known.filter(|id| members.iter().any(|m| &m.id == id)) {
            return Some(id);
        }
        let mut newest_first: Vec<&Manifest> = members.iter().collect();
        newest_first.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.id.cmp(&a.id)));
        for m in newest_first {
            match self.verify(&m.id).await {
                Ok(_) => return Some(m.id.clone()),
                Err(e) => {
                    tracing::warn!(backup_id = %m.id, error = %e, "backup does not verify; prune looks at an older one")
                }
            }
        }
        None
    }
}

/// The name of a temporary database for `target`:
/// `{target, cut}_hadr_{what}_{unix secs}_{8 hex of SHA-256(target)}{4 random hex}`. The
/// target is cut at a character boundary so that the name stays within PostgreSQL's 63
/// bytes (it would silently truncate a longer one, and two long targets could then share a
/// name); the hash tells targets with a common prefix apart and lets a later run find the
/// target of a leftover, the time tells it whether the leftover is older than itself.
fn temp_database_name(target: &str, what: TempDb, at: SystemTime) -> Result<String> {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let random: [u8; 2] = random_array()?;
    let tail = format!(
        "_hadr_{}_{secs}_{}{}",
        what.as_str(),
        target_hash(target),
        hex::encode(random)
    );
    let mut cut = 63usize.saturating_sub(tail.len()).min(target.len());
    while !target.is_char_boundary(cut) {
        cut -= 1;
    }
    Ok(format!("{}{tail}", &target[..cut]))
}

/// 8 hex digits of SHA-256 over a database name.
fn target_hash(target: &str) -> String {
    hex::encode(&ring::digest::digest(&ring::digest::SHA256, target.as_bytes()).as_ref()[..4])
}

/// What a temporary database is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TempDb {
    /// A restore in progress, renamed over its target at the end.
    Restore,
    /// The target a restore replaced, kept until the restored one took its place.
    Old,
    /// A restore test's scratch database.
    Test,
}

impl TempDb {
    fn as_str(self) -> &'static str {
        match self {
            TempDb::Restore => "restore",
            TempDb::Old => "old",
            TempDb::Test => "test",
        }
    }
}

/// Parses a name made by [`temp_database_name`]: what it is for, its time, and the hash of
/// its target.
fn parse_temp_database_name(name: &str) -> Option<(TempDb, u64, &str)> {
    let at = name.rfind("_hadr_")?;
    let rest = &name[at + "_hadr_".len()..];
    let (what, rest) = rest.split_once('_')?;
    let what = [TempDb::Restore, TempDb::Old, TempDb::Test]
        .into_iter()
        .find(|w| w.as_str() == what)?;
    let (secs, tail) = rest.split_once('_')?;
    let hex_ok = tail.len() == 12
        && tail
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if secs.is_empty() || secs.len() > 20 || !secs.bytes().all(|b| b.is_ascii_digit()) || !hex_ok {
        return None;
    }
    Some((what, secs.parse().ok()?, &tail[..8]))
}

/// Holds a session-level advisory lock on `name` (a temporary database of this run) on the
/// connection `conn`, so that no other run's cleanup drops it; it ends with the session.
async fn lock_temp_database(conn: &mut sqlx::PgConnection, name: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
        .bind(name)
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(|source| Error::Postgres {
            context: format!("lock temporary database {name}"),
            source,
        })
}

/// Drops the temporary databases that crashed runs left on `admin`'s server: those named by
/// [`temp_database_name`], made before `run_start` and not locked by a live run. A restore
/// in progress or a scratch database is dropped (without `FORCE`: one still in use is
/// skipped); a replaced target (`old`) only when a database of its target's name exists
/// again, otherwise it may be the only copy and is kept with a warning. Returns the names
/// dropped.
pub(crate) async fn clean_temp_databases(
    admin: &mut sqlx::PgConnection,
    run_start: SystemTime,
) -> Result<Vec<String>> {
    let start = run_start
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let names: Vec<String> = sqlx::query_scalar("SELECT datname::text FROM pg_database")
        .fetch_all(&mut *admin)
        .await
        .map_err(|source| Error::Postgres {
            context: "list databases".into(),
            source,
        })?;
    let mut dropped = Vec::new();
    for name in &names {
        let Some((what, secs, hash)) = parse_temp_database_name(name) else {
            continue;
        };
        if secs >= start {
            continue;
        }
        if what == TempDb::Old && !names.iter().any(|n| n != name && target_hash(n) == hash) {
            tracing::warn!(database = %name, "a crashed restore left the replaced database and no restored one took its place: kept");
            continue;
        }
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(name)
            .fetch_one(&mut *admin)
            .await
            .map_err(|source| Error::Postgres {
                context: format!("lock temporary database {name}"),
                source,
            })?;
        if !locked {
            continue;
        }
        let result = pg::execute(
            admin,
            &format!("DROP DATABASE IF EXISTS {}", pg::quote_ident(name)),
        )
        .await;
        let _ = sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
            .bind(name)
            .execute(&mut *admin)
            .await;
        match result {
            Ok(()) => {
                tracing::info!(database = %name, "dropped the temporary database of a crashed restore");
                dropped.push(name.clone());
            }
            Err(e) => {
                tracing::warn!(database = %name, error = %e, "temporary database of an earlier restore not dropped (in use?)")
            }
        }
    }
    Ok(dropped)
}

/// Checks that the plaintext of a backup can be restored, by kind: every tar header, entry
/// type, path and size, and the entry count against the manifest (directories); that the
/// JSON parses (configs); the `pg_dump` archive signature (databases).
fn check_structure(manifest: &Manifest, plain: &mut dyn Read) -> Result<String> {
    let id = manifest.id.as_str();
    match (&manifest.kind, &manifest.details) {
        (BackupKind::Dir | BackupKind::PgBase, details) => {
            let got = source::check_tar(id, plain)?;
            check_entry_count(id, details, got)?;
            Ok(format!("{got} tar entries check out"))
        }
        (BackupKind::Config, _) => {
            serde_json::from_reader::<_, source::ConfigSnapshot>(plain).map_err(|e| {
                Error::corrupt(id, format!("the config snapshot does not parse: {e}"))
            })?;
            Ok("the config snapshot parses".into())
        }
        (BackupKind::Postgres, _) => {
            let mut magic = [0u8; 5];
            plain
                .read_exact(&mut magic)
                .map_err(|e| from_io(e, || format!("read backup {id}")))?;
            if &magic != b"PGDMP" {
                return Err(Error::corrupt(id, "not a pg_dump custom-format archive"));
            }
            Ok("the pg_dump archive signature checks out".into())
        }
        _ => Ok("a plain byte stream".into()),
    }
}

/// A directory backup restores exactly the entries its manifest recorded: fewer means the
/// archive ended early (the tar reader stops at a zero block), more means entries were
/// injected.
fn check_entry_count(id: &str, details: &Details, got: u64) -> Result<()> {
    match details {
        Details::Dir { entries, .. } | Details::PgBase { entries, .. } => {
            check_entries(id, *entries, got)
        }
        _ => Err(Error::corrupt(
            id,
            "a directory backup without its entry count",
        )),
    }
}

/// The archive of backup `id` held `got` entries; its manifest recorded `recorded`.
fn check_entries(id: &str, recorded: u64, got: u64) -> Result<()> {
    if recorded == got {
        Ok(())
    } else {
        Err(Error::corrupt(
            id,
            format!("the archive holds {got} entries, the manifest recorded {recorded}"),
        ))
    }
}

/// Copies the verified stream into a child's stdin. If the child stops reading early, the
/// rest is still read (and so verified) before returning; the child's exit status tells
/// whether it got what it needed.
fn pipe_verified(reader: &mut BackupReader, stdin: Option<std::process::ChildStdin>) -> Result<()> {
    let id = reader.manifest().id.clone();
    let mut stdin = stdin;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| from_io(e, || format!("read backup {id}")))?;
        if n == 0 {
            return Ok(());
        }
        if let Some(pipe) = &mut stdin {
            match pipe.write_all(&buf[..n]) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => stdin = None,
                Err(e) => return Err(from_io(e, || "write to pg_restore".into())),
            }
        }
    }
}

/// Restores to a path by kind; returns the entry count for directories.
fn restore_to_path(reader: &mut BackupReader, target: &Path, force: bool) -> Result<Option<u64>> {
    let tree = matches!(reader.manifest().kind, BackupKind::Dir | BackupKind::PgBase);
    let placement = staging::placement(target, tree)?;
    restore_to_path_placed(reader, target, force, placement, SystemTime::now())
}

/// [`restore_to_path`] with the staging at `placement`, cleaning leftovers of runs that
/// started before `run_start`.
fn restore_to_path_placed(
    reader: &mut BackupReader,
    target: &Path,
    force: bool,
    placement: Placement,
    run_start: SystemTime,
) -> Result<Option<u64>> {
    let kind = reader.manifest().kind;
    let details = reader.manifest().details.clone();
    let tree = matches!(kind, BackupKind::Dir | BackupKind::PgBase);
    check_target(target, tree, force)?;
    // Staged privately (a 0700 dir, a 0600 file) on the target's own file system, locked
    // while this run works; removed on any error (the drop).
    let mut staging = Staging::create(target, tree, placement, run_start)?;
    let temp = staging.path().to_path_buf();
    let entries = if tree {
        let entries = extract_tree(reader, &temp)?;
        sync_tree(&temp)?;
        Some(entries)
    } else {
        let Some(file) = staging.file() else {
            return Err(Error::Task("a file staging without its file".into()));
        };
        read_ahead(reader, |plain| {
            copy_large(plain, file).map_err(|e| match from_io(e, String::new) {
                Error::Stream { source, .. } => Error::io("write", &temp, source),
                other => other,
            })
        })?;
        // The recorded mode of a file (setuid/setgid never), private for the rest.
        let mode = match &details {
            Details::File { mode } => mode & 0o777,
            _ => 0o600,
        };
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("set mode of", &temp, e))?;
        file.sync_all().map_err(|e| Error::io("fsync", &temp, e))?;
        None
    };
    staging.commit(force)?;
    Ok(entries)
}

/// Extracts the tree backup `reader` reads into `dest` and checks its entry count against
/// the manifest. Files are written back on a third thread while extraction goes on; a
/// `sync_tree` after it is still what guarantees everything reached the disk.
pub(crate) fn extract_tree(reader: &mut BackupReader, dest: &Path) -> Result<u64> {
    let id = reader.manifest().id.to_string();
    let details = reader.manifest().details.clone();
    let entries = source::with_flusher(|flush| {
        read_ahead(reader, |plain| source::extract_dir(&id, plain, dest, flush))
    })?;
    check_entry_count(&id, &details, entries)?;
    Ok(entries)
}

/// Refuses a target that holds data, unless `force`.
pub(crate) fn check_target(target: &Path, want_dir: bool, force: bool) -> Result<()> {
    let refuse = |reason: &str| Error::TargetNotEmpty {
        target: target.display().to_string(),
        reason: reason.to_owned(),
    };
    let meta = match fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", target, e)),
    };
    if meta.is_dir() {
        let empty = fs::read_dir(target)
            .map_err(|e| Error::io("list", target, e))?
            .next()
            .is_none();
        if !want_dir {
            return Err(refuse("it is a directory"));
        }
        if !empty && !force {
            return Err(refuse("the directory is not empty"));
        }
    } else if !force {
        return Err(refuse("it exists"));
    }
    Ok(())
}

/// fsyncs every regular file and directory under `root`.
pub(crate) fn sync_tree(root: &Path) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))? {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            let file_type = entry
                .file_type()
                .map_err(|e| Error::io("stat", entry.path(), e))?;
            if file_type.is_dir() {
                stack.push(entry.path());
            } else if file_type.is_file() {
                let path = entry.path();
                // Read-only files open for reading; fsync works on any descriptor.
                fs::File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io("fsync", &path, e))?;
            }
        }
        sync_dir(&dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;
    use crate::{KeyRing, MasterKey};
    use sqlx::Connection;

    /// Stores `plain` as a backup of `kind` with `details`, sealed like a real one: the
    /// cryptography is sound, only the content is what the test chose.
    fn backup_raw(repo: &Repository, kind: BackupKind, plain: &[u8], details: Details) -> BackupId {
        let id = BackupId::generate(kind.as_str(), SystemTime::now()).expect("id");
        write_object(
            &*repo.store,
            repo.keys.writer(),
            repo.compress,
            None,
            &id,
            kind,
            "test".into(),
            Vec::new(),
            |writer| {
                writer.write_all(plain).expect("write");
                Ok(details)
            },
        )
        .expect("object");
        id
    }

    fn dir_details(entries: u64) -> Details {
        Details::Dir {
            entries,
            changed: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// Finding 3: `verify` means restorable. Each of these backups is cryptographically
    /// whole, yet a restore would fail or lose data; verify refuses every one.
    /// Data that authenticates but whose plaintext is not what the (authenticated) manifest
    /// says, as a writer bug would leave it: the SHA-256, checked on the hashing thread of
    /// `read_ahead`, fails verify and restore, and the restore leaves nothing behind.
    #[tokio::test]
    async fn a_plaintext_digest_mismatch_fails_verify_and_restore() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LocalStore::open(dir.path().join("store")).expect("store");
        let repo = Repository::new(store, KeyRing::new(MasterKey::from_bytes([9; 32])));
        // Large enough for many read-ahead chunks: the mismatch is found at the very end.
        let plain: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let id = backup_raw(
            &repo,
            BackupKind::File,
            &plain,
            Details::File { mode: 0o600 },
        );
        let mut manifest = repo.manifest(&id).await.expect("manifest");
        manifest.plaintext_sha256 = "ab".repeat(32);
        repo.store
            .put_manifest(&id, &manifest.seal(repo.keys.writer()).expect("seal"))
            .expect("manifest");
        let err = repo.verify(&id).await.expect_err("verify");
        assert!(err.to_string().contains("SHA-256"), "{err}");
        let out = dir.path().join("restored");
        let err = repo
            .restore(&id, &RestoreTarget::Path(out.clone()), false)
            .await
            .expect_err("restore");
        assert!(err.to_string().contains("SHA-256"), "{err}");
        assert!(!out.exists(), "a failed restore leaves no file");
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    }

    #[tokio::test]
    async fn verify_walks_the_archive_structure_of_every_kind() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LocalStore::open(dir.path().join("store")).expect("store");
        let repo = Repository::new(store, KeyRing::new(MasterKey::from_bytes([9; 32])));
        let tar_of = |names: &[&str]| {
            let mut builder = tar::Builder::new(Vec::new());
            for name in names {
                let mut header = tar::Header::new_gnu();
                header.set_size(3);
                header.set_mode(0o644);
                builder
                    .append_data(&mut header, name, &b"abc"[..])
                    .expect("append");
            }
            builder.into_inner().expect("tar")
        };
        let good = tar_of(&["a", "b", "c"]);
        let id = backup_raw(&repo, BackupKind::Dir, &good, dir_details(3));
        let checked = repo.verify(&id).await.expect("a sound backup verifies");
        assert!(
            checked.detail.contains("3 tar entries"),
            "{}",
            checked.detail
        );

        let mut fifo = tar::Header::new_gnu();
        fifo.set_entry_type(tar::EntryType::Fifo);
        fifo.set_size(0);
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_data(&mut fifo, "fifo", io::empty())
            .expect("fifo");
        let fifo_tar = builder.into_inner().expect("tar");
        let mut cut = good.clone();
        cut.truncate(512 + 100);
        let mut junk = good.clone();
        junk.extend_from_slice(b"trailing junk");
        let cases: Vec<(&str, BackupKind, Vec<u8>, Details)> = vec![
            (
                "fewer entries than recorded",
                BackupKind::Dir,
                good.clone(),
                dir_details(4),
            ),
            (
                "more entries than recorded",
                BackupKind::Dir,
                good.clone(),
                dir_details(2),
            ),
            (
                "a refused entry type",
                BackupKind::Dir,
                fifo_tar,
                dir_details(1),
            ),
            ("an entry cut short", BackupKind::Dir, cut, dir_details(3)),
            (
                "data after the archive",
                BackupKind::Dir,
                junk,
                dir_details(3),
            ),
            (
                "a config that does not parse",
                BackupKind::Config,
                b"{not json".to_vec(),
                Details::None,
            ),
            (
                "a dump without its signature",
                BackupKind::Postgres,
                b"nope".to_vec(),
                Details::None,
            ),
        ];
        for (case, kind, plain, details) in cases {
            let id = backup_raw(&repo, kind, &plain, details);
            let err = repo.verify(&id).await.expect_err(case);
            assert!(
                matches!(
                    err,
                    Error::Corrupt { .. } | Error::UnsafeEntry { .. } | Error::Stream { .. }
                ),
                "{case}: {err}"
            );
            if kind == BackupKind::Dir {
                let out = dir.path().join(format!("out-{}", id.as_str()));
                let restored = repo
                    .restore(&id, &RestoreTarget::Path(out.clone()), false)
                    .await;
                assert!(restored.is_err(), "{case}: restore must refuse it too");
                assert!(!out.exists(), "{case}: nothing at the target");
            }
        }
    }

    /// Finding 5: when the restored database cannot take the target's place, the target
    /// is back under its own name with its data, the restored copy is gone, and the
    /// safety backup was verified.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_database_swap_keeps_the_old_database() {
        let pg = ha_testkit::PostgresServer::start().await.expect("server");
        pg.execute("CREATE DATABASE app").await.expect("create");
        let mut app = pg.connect_to("app").await.expect("app");
        sqlx::raw_sql("CREATE TABLE t (v int); INSERT INTO t VALUES (1), (2)")
            .execute(&mut app)
            .await
            .expect("rows");
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LocalStore::open(dir.path().join("store")).expect("store");
        let mut repo = Repository::new(store, KeyRing::new(MasterKey::from_bytes([9; 32])));
        let tools = PgTools::in_dir(ha_testkit::binaries::postgres_bin_dir().expect("pg bin"));
        let url = pg.url_for("app");
        let m = repo
            .backup(&Source::postgres(&url, tools.clone()), &[])
            .await
            .expect("backup");
        sqlx::raw_sql("INSERT INTO t VALUES (3)")
            .execute(&mut app)
            .await
            .expect("row");
        app.close().await.expect("close");
        repo.fail_swap = true;
        let target = RestoreTarget::Postgres {
            url: url.clone(),
            tools: tools.clone(),
        };
        let err = repo
            .restore(&m.id, &target, true)
            .await
            .expect_err("injected");
        assert!(err.to_string().contains("injected"), "{err}");
        let mut conn = pg.connect_to("app").await.expect("app is there");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&mut conn)
            .await
            .expect("count");
        assert_eq!(
            rows, 3,
            "the old database, with the row written after the backup"
        );
        let mut admin = pg.connect().await.expect("admin");
        let names: Vec<String> =
            sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE '%hadr%'")
                .fetch_all(&mut admin)
                .await
                .expect("names");
        assert!(
            names.is_empty(),
            "no restore or aside database left: {names:?}"
        );
        let (safety, _) = repo.list_authenticated().await.expect("list");
        assert!(safety.iter().any(|m| m.tags == ["pre-restore-safety"]));
        // Without the fault, the same restore replaces it.
        repo.fail_swap = false;
        repo.restore(&m.id, &target, true).await.expect("restore");
        let mut conn = pg.connect_to("app").await.expect("app is there");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&mut conn)
            .await
            .expect("count");
        assert_eq!(rows, 2);
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".ha-dr-"))
            .collect()
    }

    /// Finding 11: a mount point cannot be renamed over, so its restore is staged inside it
    /// and the entries moved in. Without a mount here (that needs root), the placement a
    /// mount point gets is forced on a plain directory: the directory itself stays (same
    /// inode), gets the backup's entries and root mode, and keeps nothing of ours; with
    /// `force` its old entries go; a backup that does not verify leaves it as it was.
    #[tokio::test]
    async fn a_restore_staged_inside_the_target_moves_the_entries_in() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("sub")).expect("src");
        fs::write(src.join("a"), b"alpha").expect("a");
        fs::write(src.join("sub").join("b"), b"beta").expect("b");
        fs::set_permissions(&src, fs::Permissions::from_mode(0o750)).expect("mode");
        let store = LocalStore::open(dir.path().join("store")).expect("store");
        let repo = Repository::new(store, KeyRing::new(MasterKey::from_bytes([9; 32])));
        let m = repo.backup(&Source::dir(&src), &[]).await.expect("backup");
        let target = dir.path().join("mnt");
        fs::create_dir(&target).expect("target");
        let inode = fs::metadata(&target).expect("stat").ino();
        let restore = |id: &BackupId, force: bool| {
            let mut reader = BackupReader::open(&*repo.store, &repo.keys, id)?;
            restore_to_path_placed(
                &mut reader,
                &target,
                force,
                Placement::Inside,
                SystemTime::now(),
            )
        };
        assert_eq!(
            restore(&m.id, false).expect("restore"),
            Some(4),
            "root, a, sub, sub/b"
        );
        let check = || {
            assert_eq!(
                fs::metadata(&target).expect("stat").ino(),
                inode,
                "same dir"
            );
            assert_eq!(fs::read(target.join("a")).expect("a"), b"alpha");
            assert_eq!(fs::read(target.join("sub/b")).expect("b"), b"beta");
            let mode = fs::metadata(&target).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o750, "the backup's root mode");
            assert_eq!(leftovers(&target), Vec::<String>::new());
            assert_eq!(leftovers(dir.path()), Vec::<String>::new());
        };
        check();
        // Not over data without force; with it, the old entries go.
        let err = restore(&m.id, false).expect_err("not empty");
        assert!(matches!(err, Error::TargetNotEmpty { .. }), "{err}");
        fs::write(target.join("junk"), b"old").expect("junk");
        restore(&m.id, true).expect("forced restore");
        assert!(!target.join("junk").exists(), "replaced");
        check();
        // A backup that does not verify (one entry fewer than recorded) changes nothing.
        let tar = {
            let mut builder = tar::Builder::new(Vec::new());
            let mut header = tar::Header::new_gnu();
            header.set_size(1);
            header.set_mode(0o644);
            builder
                .append_data(&mut header, "x", &b"x"[..])
                .expect("tar");
            builder.into_inner().expect("tar")
        };
        let bad = backup_raw(&repo, BackupKind::Dir, &tar, dir_details(2));
        assert!(restore(&bad, true).is_err());
        assert!(!target.join("x").exists());
        check();
    }

    /// Finding 12: the staging a crashed restore left beside a target is removed by the next
    /// restore there.
    #[tokio::test]
    async fn a_restore_removes_the_staging_of_a_crashed_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let src = dir.path().join("src");
        fs::create_dir(&src).expect("src");
        fs::write(src.join("a"), b"alpha").expect("a");
        let store = LocalStore::open(dir.path().join("store")).expect("store");
        let repo = Repository::new(store, KeyRing::new(MasterKey::from_bytes([9; 32])));
        let m = repo.backup(&Source::dir(&src), &[]).await.expect("backup");
        let crashed = dir
            .path()
            .join(".ha-dr-restore-1700000000-0123456789ab-out");
        fs::create_dir(&crashed).expect("leftover");
        fs::write(crashed.join("half"), b"half").expect("half");
        let out = dir.path().join("out");
        repo.restore(&m.id, &RestoreTarget::Path(out.clone()), false)
            .await
            .expect("restore");
        assert_eq!(fs::read(out.join("a")).expect("a"), b"alpha");
        assert!(!crashed.exists(), "the crashed run's staging is gone");
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    }

    /// Finding 12: at most 63 bytes, two long targets with a common prefix get names a
    /// later run tells apart, and the name parses back to its purpose, time and target.
    #[test]
    fn temp_database_names_fit_in_63_bytes() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let long = "é".repeat(40);
        let long_a = format!("{}a", "x".repeat(70));
        let long_b = format!("{}b", "x".repeat(70));
        for target in ["app", long.as_str(), &long_a, &long_b, &"y".repeat(63)] {
            for what in [TempDb::Restore, TempDb::Old, TempDb::Test] {
                let name = temp_database_name(target, what, at).expect("name");
                assert!(name.len() <= 63, "{name}");
                assert!(
                    name.contains(&format!("_hadr_{}_", what.as_str())),
                    "{name}"
                );
                assert_eq!(
                    parse_temp_database_name(&name),
                    Some((what, 1_800_000_000, target_hash(target).as_str())),
                    "{name}"
                );
            }
        }
        let a = temp_database_name(&long_a, TempDb::Restore, at).expect("name");
        let b = temp_database_name(&long_b, TempDb::Restore, at).expect("name");
        assert_ne!(a[..a.len() - 4], b[..b.len() - 4], "the hashes differ");
        for foreign in [
            "app",
            "app_hadr_restore_1_abc",
            "app_hadr_copy_1_0123456789ab",
        ] {
            assert_eq!(parse_temp_database_name(foreign), None, "{foreign}");
        }
    }

    /// Finding 12: temporary databases a crashed restore left are dropped by the next run on
    /// that server, if older than it and not locked by a live run; a replaced database only
    /// once its target exists again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn temporary_databases_of_crashed_restores_are_dropped() {
        let pg = ha_testkit::PostgresServer::start().await.expect("server");
        let past = SystemTime::now() - Duration::from_secs(3600);
        let crashed = temp_database_name("app", TempDb::Restore, past).expect("name");
        let scratch = temp_database_name("verify", TempDb::Test, past).expect("name");
        let live = temp_database_name("app", TempDb::Restore, past).expect("name");
        let replaced = temp_database_name("app", TempDb::Old, past).expect("name");
        let only_copy = temp_database_name("gone", TempDb::Old, past).expect("name");
        let current = temp_database_name(
            "app",
            TempDb::Restore,
            SystemTime::now() + Duration::from_secs(5),
        )
        .expect("name");
        for name in ["app", "someone_hadr_else"]
            .into_iter()
            .chain([&crashed, &scratch, &live, &replaced, &only_copy, &current].map(String::as_str))
        {
            pg.execute(&format!("CREATE DATABASE {}", pg::quote_ident(name)))
                .await
                .expect("create");
        }
        // A live run holds its lock on its own session.
        let mut holder = pg.connect().await.expect("holder");
        lock_temp_database(&mut holder, &live).await.expect("lock");
        let mut admin = pg.connect().await.expect("admin");
        let dropped = clean_temp_databases(&mut admin, SystemTime::now())
            .await
            .expect("clean");
        let mut want = vec![crashed.clone(), scratch.clone(), replaced.clone()];
        want.sort();
        let mut dropped = dropped;
        dropped.sort();
        assert_eq!(dropped, want);
        let left: Vec<String> = sqlx::query_scalar("SELECT datname::text FROM pg_database")
            .fetch_all(&mut admin)
            .await
            .expect("names");
        for name in [&live, &only_copy, &current] {
            assert!(left.contains(name), "{name} kept: {left:?}");
        }
        for name in ["app", "someone_hadr_else"] {
            assert!(left.iter().any(|n| n == name), "{name} is not ours");
        }
        holder.close().await.expect("close");
    }
}
