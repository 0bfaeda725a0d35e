//! Cross-process tests of the node: three real `ha-node` processes on a real `redis-server`,
//! driven as an operator would — through `hactl`, the HTTP API and signals.
//!
//! The binaries come from `cargo build -p ha-orchestrator --bins` (a test in this package
//! cannot make Cargo build another package's binaries); a missing or stale one fails the test
//! with that command. The tests run one at a time: each measures a deadline on a shared
//! two-core machine.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ha_testkit::{HaNodeCluster, HaNodeOptions, RedisServer};

const BUILD_HINT: &str = "cargo build -p ha-orchestrator --bins";
const TOKEN: &str = "e2e-admin-token-0123456789";
const TTL: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(200);

/// One cluster at a time: the deadlines below assume the machine is not running another.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn binary(name: &str) -> PathBuf {
    ha_testkit::ha_node::built_binary(name, BUILD_HINT).unwrap_or_else(|e| panic!("{e}"))
}

/// A Redis server and three nodes a, b, c on it; the nodes go first on drop (they release
/// their leases into a live store).
struct Setup {
    cluster: HaNodeCluster,
    _redis: RedisServer,
    _runtime: tokio::runtime::Runtime,
}

fn setup(extra_toml: &str) -> Setup {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let redis = runtime
        .block_on(RedisServer::start())
        .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
    let options = HaNodeOptions {
        ttl: TTL,
        retry: RETRY,
        heartbeat: Duration::from_millis(500),
        admin_token: TOKEN.into(),
        extra_toml: extra_toml.into(),
        ..HaNodeOptions::default()
    };
    let cluster =
        HaNodeCluster::start(&binary("ha-node"), &redis.url(), &["a", "b", "c"], &options)
            .unwrap_or_else(|e| panic!("cannot start the nodes: {e}"));
    Setup {
        cluster,
        _redis: redis,
        _runtime: runtime,
    }
}

impl Setup {
    /// Runs `hactl --url <every node> --token … args`; panics with its output if it fails.
    fn hactl(&self, args: &[&str]) -> String {
        let urls: Vec<String> = self.cluster.nodes().iter().map(|n| n.url()).collect();
        let output: Output = Command::new(binary("hactl"))
            .arg("--url")
            .arg(urls.join(","))
            .arg("--token")
            .arg(TOKEN)
            .args(args)
            .env_remove("HA_ADMIN_TOKEN")
            .env_remove("HACTL_URL")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "hactl {args:?} failed ({}):\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    fn wait_leader(&self, except: Option<&str>) -> (String, Instant) {
        self.cluster
            .wait_leader(except, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `GET path` on node `id`, as JSON.
    fn json(&self, id: &str, path: &str) -> (u16, serde_json::Value) {
        let (code, body) = self.cluster.node(id).get(path).unwrap();
        let value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path} on {id}: {e}: {body}"));
        (code, value)
    }

    /// The fencing token node `id` leads with.
    fn token(&self, id: &str) -> u64 {
        let (code, body) = self.json(id, "/leader");
        assert_eq!(code, 200, "{id} does not lead: {body}");
        body["token"].as_u64().unwrap()
    }
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after `limit`.
fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if condition() {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The data rows of `hactl list` (header dropped), split into columns.
fn list_rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[test]
fn hactl_list_shows_one_leader_among_three_members() {
    let _serial = serial();
    let s = setup("");
    let (leader, _) = s.wait_leader(None);
    let mut table = String::new();
    wait_until(
        "hactl list shows three members and a leader",
        Duration::from_secs(10),
        || {
            table = s.hactl(&["list"]);
            let rows = list_rows(&table);
            rows.len() == 3 && rows.iter().any(|r| r[1] == "leader")
        },
    );
    let rows = list_rows(&table);
    let leaders: Vec<&Vec<String>> = rows.iter().filter(|r| r[1] == "leader").collect();
    assert_eq!(leaders.len(), 1, "exactly one leader row:\n{table}");
    assert_eq!(leaders[0][0], leader, "{table}");
    let mut names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["a", "b", "c"], "{table}");
    assert!(
        rows.iter()
            .filter(|r| r[1] != "leader")
            .all(|r| r[1] == "follower"),
        "{table}"
    );
}

#[test]
fn a_killed_leader_is_replaced_within_ttl_and_two_retries() {
    let _serial = serial();
    let mut s = setup("");
    let (old, _) = s.wait_leader(None);
    let old_token = s.token(&old);
    let bound = TTL + 2 * RETRY + Duration::from_millis(300);

    let killed_at = Instant::now();
    s.cluster.node_mut(&old).kill().unwrap();
    let (new, seen_at) = s.wait_leader(Some(&old));
    let took = seen_at - killed_at;
    assert!(
        took <= bound,
        "{new} led {took:?} after {old} was killed (bound {bound:?})"
    );
    assert_ne!(new, old);
    let new_token = s.token(&new);
    assert!(
        new_token > old_token,
        "token of {new} ({new_token}) not above {old}'s ({old_token})"
    );
    assert_eq!(
        s.cluster.leaders(),
        [new.as_str()],
        "one leader after the crash"
    );
    // Every survivor sees the new leader on its own /leader answer.
    for node in s.cluster.nodes().iter().filter(|n| n.is_running()) {
        let (_, body) = s.json(node.id(), "/leader");
        assert_eq!(
            body["leader"].as_str(),
            Some(new.as_str()),
            "{}: {body}",
            node.id()
        );
    }
}

#[test]
fn switchover_hands_over_in_milliseconds_and_to_a_chosen_member() {
    let _serial = serial();
    let s = setup("");
    let (first, _) = s.wait_leader(None);
    // Every member registered, so a targeted switchover can hold the others off.
    wait_until("three members listed", Duration::from_secs(10), || {
        list_rows(&s.hactl(&["list"])).len() == 3
    });

    // Timed through the API: hactl's own start-up and leader lookup are not the handover.
    let sent = Instant::now();
    let (code, body) = s
        .cluster
        .node(&first)
        .post("/switchover", Some(TOKEN))
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let (second, seen_at) = s.wait_leader(Some(&first));
    let took = seen_at - sent;
    assert!(
        took < Duration::from_millis(100),
        "switchover from {first} to {second} took {took:?}"
    );

    // The same through hactl.
    let out = s.hactl(&["switchover"]);
    assert!(out.contains("stepped_down"), "{out}");
    let (third, _) = s.wait_leader(Some(&second));
    assert_ne!(third, second);

    // `--to`: c must be a follower, then a switchover to another member holds c off for a
    // ttl, and one to c right after must still go to c at once.
    let mut current = third;
    if current == "c" {
        s.hactl(&["switchover", "--to", "a"]);
        wait_until("a leads", Duration::from_secs(5), || {
            s.cluster.leaders() == ["a"]
        });
        current = "a".to_owned();
    }
    let other = ["a", "b"].into_iter().find(|n| *n != current).unwrap();
    s.hactl(&["switchover", "--to", other]);
    wait_until(&format!("{other} leads"), Duration::from_secs(5), || {
        s.cluster.leaders() == [other]
    });
    let sent = Instant::now();
    s.hactl(&["switchover", "--to", "c"]);
    let took = wait_until("c leads", Duration::from_secs(5), || {
        s.cluster.leaders() == ["c"]
    });
    // Well under a ttl: c did not wait out the hold of the previous switchover.
    assert!(sent.elapsed() < TTL, "--to c took {took:?}");
}

/// A TCP service the test controls: accepted and closed at once while open; refused after
/// [`close`](Self::close).
struct Service {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Service {
    fn open() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => drop(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops accepting and closes the listening socket (joins its thread).
    fn close(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.close();
    }
}

fn check_and_failover(name: &str, addr: SocketAddr, log: &Path) -> String {
    format!(
        r#"
[[checks]]
name = "{name}"
kind = "tcp"
address = "{addr}"
interval = "200ms"
timeout = "200ms"
failure_threshold = 2

[[failover.components]]
name = "{name}"
action = {{ kind = "command", command = ["sh", "-c", "echo $HA_NODE >> {log}"] }}
timeout = "5s"
cooldown = "1m"
"#,
        log = log.display()
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The status of check `name` in node `id`'s `/status`.
fn check_status(s: &Setup, id: &str, name: &str) -> String {
    let (_, status) = s.json(id, "/status");
    status["health"]["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .and_then(|c| c["status"].as_str())
        .unwrap_or("-")
        .to_owned()
}

#[test]
fn pause_holds_back_a_failover_that_resume_then_runs_once_on_the_leader() {
    let _serial = serial();
    let files = tempfile::tempdir().unwrap();
    let paused_log = files.path().join("paused.log");
    let control_log = files.path().join("control.log");
    let mut paused_service = Service::open();
    let mut control_service = Service::open();
    let s = setup(&format!(
        "{}{}",
        check_and_failover("paused", paused_service.addr, &paused_log),
        check_and_failover("control", control_service.addr, &control_log),
    ));
    let (leader, _) = s.wait_leader(None);
    wait_until(
        "the checks pass on the leader",
        Duration::from_secs(10),
        || {
            check_status(&s, &leader, "paused") == "healthy"
                && check_status(&s, &leader, "control") == "healthy"
        },
    );

    // Paused: the service goes down, the leader sees it, and nothing runs.
    let out = s.hactl(&["pause"]);
    assert_eq!(out.matches("\"paused\":true").count(), 3, "{out}");
    for node in s.cluster.nodes() {
        let (_, status) = s.json(node.id(), "/status");
        assert_eq!(status["paused"], true, "{}", node.id());
    }
    let window = Duration::from_secs(3);
    let closed = Instant::now();
    paused_service.close();
    wait_until("the leader sees the service down", window, || {
        check_status(&s, &leader, "paused") == "unhealthy"
    });
    while closed.elapsed() < window {
        assert_eq!(
            lines(&paused_log),
            Vec::<String>::new(),
            "a failover ran while paused"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(lines(&paused_log).is_empty(), "a failover ran while paused");
    assert_eq!(
        s.cluster.leaders(),
        [leader.as_str()],
        "leadership moved during the test"
    );

    // Resumed: the held-back failover runs once, on the leader.
    let out = s.hactl(&["resume"]);
    assert_eq!(out.matches("\"paused\":false").count(), 3, "{out}");
    wait_until(
        "the failover runs after resume",
        Duration::from_secs(5),
        || !lines(&paused_log).is_empty(),
    );
    // Followers re-ask the gate every second: give them two chances to run it wrongly.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(2100) {
        assert_eq!(
            lines(&paused_log),
            [leader.as_str()],
            "exactly one run, by the leader"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Control, not paused: the same fault fails over well within the window waited above.
    let closed = Instant::now();
    control_service.close();
    let took = wait_until("the unpaused failover runs", window, || {
        !lines(&control_log).is_empty()
    });
    assert!(took < window, "unpaused failover took {took:?}");
    assert_eq!(
        lines(&control_log),
        [leader.as_str()],
        "{:?}",
        closed.elapsed()
    );
}
