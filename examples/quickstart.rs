//! The quickstart, on embedded defaults only: no servers, no config, ends by itself.
//!
//! Three HA nodes run in this process, each on its own Tokio runtime and thread (so one can
//! "crash": its runtime is dropped mid-flight, it never releases anything), electing their
//! leader on one in-memory lease store. Every node health-checks the same two in-process
//! backends, and a shared `Router` sends "requests" to the primary one. The script:
//!
//! 1. the nodes elect a leader;
//! 2. the leader crashes → another node leads with a greater fencing token;
//! 3. the primary backend fails → its check goes unhealthy on every node → the leader (only
//!    the leader) fails the router over to the secondary;
//! 4. a backup is taken on the new leader through its HTTP API, verified and restored;
//! 5. the HA level of each node, and the leader's `/status`.
//!
//! Run it with `cargo run --example quickstart` (logs: `RUST_LOG=info`).
#![allow(clippy::print_stdout)] // printing the timeline is what this program is for

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ha_core::{HaEvent, HaLevel};
use ha_dr::{
    BackupScheduler, KeyRing, LocalStore, MasterKey, RestoreTarget, ScheduleConfig, Source,
    SourceSchedule,
};
use ha_election::{ElectorConfig, LeaseStore, MemoryLeaseStore};
use ha_failover::{ComponentConfig, Router, RouterSwitch, Target};
use ha_health::{CheckConfig, CheckResult, FnCheck};
use ha_orchestrator::HaNode;
use ha_replication::FileSync;
use ha_replication::files::{FileReplicator, FileSyncConfig, LocalTarget};
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const ADMIN_TOKEN: &str = "quickstart-admin-token";
const TTL: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_millis(100);

/// One "process": a node on its own runtime and thread.
struct Process {
    node: HaNode,
    stop: Option<tokio::sync::oneshot::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    /// Stops the node: gracefully (`crash = false`), or by dropping its runtime with every
    /// task in flight (`crash = true`): no release, no goodbye — the others must notice.
    fn stop(&mut self, crash: bool) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(crash);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Everything the nodes share: the lease store, the backends, the router and the dirs.
struct World {
    store: Arc<dyn LeaseStore>,
    primary_up: Arc<AtomicBool>,
    router: Router<String>,
    dir: tempfile::TempDir,
    key: MasterKey,
}

impl World {
    fn new() -> Result<Self, BoxError> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("app-data");
        std::fs::create_dir_all(&data)?;
        for i in 0..20 {
            std::fs::write(
                data.join(format!("order-{i:03}.json")),
                format!("{{\"order\":{i}}}\n"),
            )?;
        }
        Ok(Self {
            store: Arc::new(MemoryLeaseStore::new()),
            primary_up: Arc::new(AtomicBool::new(true)),
            router: Router::new(
                "backend-primary:5432".into(),
                "backend-secondary:5432".into(),
            ),
            key: MasterKey::generate()?,
            dir,
        })
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("app-data")
    }

    /// Starts node `name` on its own runtime and thread.
    fn spawn(&self, name: &str) -> Result<Process, BoxError> {
        let builder = self.node(name)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<bool>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let crash = runtime.block_on(async move {
                    let node = match builder.build() {
                        Ok(node) => node,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return false;
                        }
                    };
                    if let Err(e) = node.start().await {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return false;
                    }
                    let _ = ready_tx.send(Ok(node.clone()));
                    let crash = stop_rx.await.unwrap_or(true);
                    if !crash {
                        node.shutdown().await;
                    }
                    crash
                });
                if crash {
                    // Every task of this node is dropped where it stands.
                    runtime.shutdown_background();
                }
            })?;
        let node = ready_rx.recv()??;
        Ok(Process {
            node,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    fn node(&self, name: &str) -> Result<ha_orchestrator::HaNodeBuilder, BoxError> {
        let primary_up = Arc::clone(&self.primary_up);
        let backend = FnCheck::new("backend", move || {
            let up = primary_up.load(Ordering::SeqCst);
            async move {
                if up {
                    CheckResult::healthy("backend-primary answers")
                } else {
                    CheckResult::unhealthy("backend-primary: connection refused")
                }
            }
        });
        let check = CheckConfig::default()
            .interval(Duration::from_millis(200))
            .timeout(Duration::from_millis(100))
            .thresholds(2, 1);
        let failover = ComponentConfig {
            timeout: Duration::from_secs(5),
            ..ComponentConfig::default()
        };

        // Replication: every node keeps its own copy of the application's data.
        let replica = self.dir.path().join(format!("replica-{name}"));
        std::fs::create_dir_all(&replica)?;
        let replicator = FileReplicator::new(
            self.data(),
            LocalTarget::new(replica),
            FileSyncConfig::default(),
        )?;
        let files = FileSync::new(replicator, Duration::from_secs(1))?;

        // Backups: the leader (only) writes encrypted, verified backups to one repository.
        let repo = ha_dr::Repository::new(
            LocalStore::open(self.dir.path().join("backups"))?,
            KeyRing::new(self.key.clone()),
        );
        let mut schedule = ScheduleConfig::default();
        schedule.sources.insert(
            "app-data".into(),
            SourceSchedule {
                interval: Some(Duration::from_secs(3600)),
                rpo: Some(Duration::from_secs(600)),
                ..SourceSchedule::default()
            },
        );
        let backups = BackupScheduler::builder(repo)
            .config(schedule)
            .source("app-data", Source::dir(self.data()))
            .build()?;

        Ok(HaNode::builder()
            .node_id(name)
            .cluster("quickstart")
            .election_with(
                Arc::clone(&self.store),
                ElectorConfig::with_ttl("-", TTL, RETRY),
            )
            .check(backend, check)
            .failover("backend", RouterSwitch::new(self.router.clone()), failover)
            .file_sync(files)
            .backups(backups)
            .http("127.0.0.1:0".parse()?)
            .admin_token(ADMIN_TOKEN))
    }
}

/// Prints a line of the timeline.
struct Timeline {
    start: Instant,
}

impl Timeline {
    fn say(&self, text: impl AsRef<str>) {
        println!(
            "[{:>6.2}s] {}",
            self.start.elapsed().as_secs_f64(),
            text.as_ref()
        );
    }
}

/// Polls `done` every 20 ms until it holds or `limit` passes.
async fn until<T>(limit: Duration, mut done: impl FnMut() -> Option<T>) -> Result<T, BoxError> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = done() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(format!("gave up after {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn leader(processes: &[Process]) -> Option<(usize, u64)> {
    processes
        .iter()
        .enumerate()
        .filter(|(_, p)| p.stop.is_some())
        .find_map(|(i, p)| p.node.is_leader().map(|l| (i, l.token.get())))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    ha_examples::init_tracing_quiet();
    let t = Timeline {
        start: Instant::now(),
    };
    let world = World::new()?;
    t.say("starting three nodes (one in-memory lease store, ttl 1 s, retry 100 ms)");
    let mut processes = vec![
        world.spawn("node-1")?,
        world.spawn("node-2")?,
        world.spawn("node-3")?,
    ];
    for p in &processes {
        watch_events(&t, &p.node);
    }
    let (first, token) = until(Duration::from_secs(10), || leader(&processes)).await?;
    t.say(format!(
        "{} leads with fencing token {token}",
        processes[first].node.node_id()
    ));
    until(Duration::from_secs(10), || {
        processes.iter().all(|p| p.node.is_ready()).then_some(())
    })
    .await?;
    t.say("every node is ready (its critical checks are healthy)");

    t.say(format!(
        "CRASH: {} dies without a word",
        processes[first].node.node_id()
    ));
    let crashed = Instant::now();
    processes[first].stop(true);
    let (second, new_token) = until(Duration::from_secs(10), || leader(&processes)).await?;
    t.say(format!(
        "{} leads with token {new_token} (> {token}) {:.0} ms after the crash",
        processes[second].node.node_id(),
        crashed.elapsed().as_secs_f64() * 1000.0
    ));
    assert!(new_token > token, "tokens only grow");

    t.say(format!(
        "requests go to {}; now the primary backend fails",
        world.router.current()
    ));
    world.primary_up.store(false, Ordering::SeqCst);
    let failed = Instant::now();
    until(Duration::from_secs(10), || {
        (world.router.active() == Target::Secondary).then_some(())
    })
    .await?;
    t.say(format!(
        "the router moved to {} {:.0} ms after the failure (only the leader switched it)",
        world.router.current(),
        failed.elapsed().as_secs_f64() * 1000.0
    ));

    let api = processes[second]
        .node
        .http_addr()
        .ok_or("the leader has no API")?;
    t.say(format!(
        "POST http://{api}/backup?source=app-data (admin token)"
    ));
    let answer = reqwest::Client::new()
        .post(format!("http://{api}/backup?source=app-data"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    let status = answer.status();
    let body: serde_json::Value = serde_json::from_slice(&answer.bytes().await?)?;
    if !status.is_success() {
        return Err(format!("backup refused: {status} {body}").into());
    }
    let id = body["backup"]["id"]
        .as_str()
        .ok_or("no backup id in the answer")?
        .to_owned();
    t.say(format!("backup {id} written and verified by the leader"));
    let repo = ha_dr::Repository::new(
        LocalStore::open(world.dir.path().join("backups"))?,
        KeyRing::new(world.key.clone()),
    );
    let backup_id = repo
        .list()
        .await?
        .into_iter()
        .map(|m| m.id)
        .find(|b| b.as_str() == id)
        .ok_or("the backup is not in the repository")?;
    repo.verify(&backup_id).await?;
    let restored = world.dir.path().join("restored");
    let checked = repo
        .restore(&backup_id, &RestoreTarget::Path(restored.clone()), false)
        .await?;
    let files = count_files(&restored)?;
    t.say(format!(
        "restored {files} files in {:.0} ms, every segment authenticated",
        checked.duration.as_secs_f64() * 1000.0
    ));
    assert_eq!(
        files,
        count_files(&world.data())?,
        "the restore has every file"
    );

    let leader_node = processes[second].node.clone();
    let level = until(Duration::from_secs(10), || {
        let level = leader_node.level();
        (level.level == HaLevel::Enterprise).then_some(level)
    })
    .await
    .unwrap_or_else(|_| leader_node.level());
    for p in processes.iter().filter(|p| p.stop.is_some()) {
        let level = p.node.level();
        t.say(format!(
            "{}: HA level {} (target {} %)",
            p.node.node_id(),
            level.summary(),
            level.target_percent
        ));
    }
    t.say(format!("the leader delivers {} ", level.summary()));

    let status = reqwest::get(format!("http://{api}/status"))
        .await?
        .text()
        .await?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    println!(
        "\nGET http://{api}/status\n{}",
        serde_json::to_string_pretty(&status)?
    );

    for p in &mut processes {
        p.stop(false);
    }
    t.say("every node shut down gracefully; bye");
    Ok(())
}

/// Prints the events that make the story, from every node's bus.
fn watch_events(t: &Timeline, node: &HaNode) {
    let mut events = node.bus().subscribe();
    let start = t.start;
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            let line = match &event {
                HaEvent::LeadershipAcquired { node, token, .. } => {
                    format!("event {node}: leadership acquired (token {token})")
                }
                HaEvent::HealthChanged {
                    node,
                    component,
                    to,
                    ..
                } if component == "backend" && *to != ha_core::Status::Unknown => {
                    format!("event {node}: check {component} is {to:?}")
                }
                HaEvent::FailoverStarted {
                    node,
                    component,
                    token,
                    ..
                } => {
                    format!(
                        "event {node}: failover of {component} started (token {})",
                        token.map_or("-".into(), |t| t.to_string())
                    )
                }
                HaEvent::FailoverCompleted {
                    node,
                    component,
                    duration,
                    ..
                } => {
                    format!("event {node}: failover of {component} completed in {duration:?}")
                }
                HaEvent::BackupCompleted { node, bytes, .. } => {
                    format!("event {node}: backup completed ({bytes} bytes)")
                }
                _ => continue,
            };
            println!(
                "[{:>6.2}s]   {line} [{}]",
                start.elapsed().as_secs_f64(),
                event.severity().as_str()
            );
        }
    });
}

fn count_files(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        if entry?.file_type()?.is_file() {
            n += 1;
        }
    }
    Ok(n)
}
