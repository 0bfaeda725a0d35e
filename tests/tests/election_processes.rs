//! External fault tests: three `election-node` processes (the example) on a real Redis,
//! faulted with real signals — SIGSTOP (a process pause), SIGKILL (a crash) and SIGTERM (a
//! graceful stop). The invariant is checked from their own JSON lines on CLOCK_MONOTONIC,
//! which all processes on one machine share: the leadership intervals of different terms never
//! overlap, and tokens grow with time.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ha_testkit::RedisServer;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[derive(Clone, Debug)]
struct Line {
    event: String,
    node: String,
    token: u64,
    mono_ns: i128,
    valid_until_mono_ns: Option<i128>,
}

/// The example binary, built with the workspace's test targets (`cargo test` and nextest both
/// build examples before running tests).
fn node_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = profile_dir.join("examples").join("election-node");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --example election-node`",
        path.display()
    );
    path
}

struct Node {
    name: String,
    child: Child,
}

impl Node {
    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = kill(self.pid(), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(url: &str, name: &str, log: &Arc<Mutex<Vec<Line>>>) -> Node {
    let mut child = Command::new(node_binary())
        .args([
            "--store",
            url,
            "--key",
            "processes/leader",
            "--node-id",
            name,
            "--ttl",
            "2s",
            "--retry",
            "200ms",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let log = Arc::clone(log);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            log.lock().unwrap().push(Line {
                event: v["event"].as_str().unwrap().to_owned(),
                node: v["node"].as_str().unwrap().to_owned(),
                token: v["token"].as_u64().unwrap(),
                mono_ns: v["mono_ns"].as_i64().unwrap().into(),
                valid_until_mono_ns: v["valid_until_mono_ns"].as_i64().map(i128::from),
            });
        }
    });
    Node {
        name: name.to_owned(),
        child,
    }
}

/// Waits until an `acquired` line from a node other than `except` appears after line `from`.
fn wait_acquired(
    log: &Arc<Mutex<Vec<Line>>>,
    from: usize,
    except: Option<&str>,
    limit: Duration,
) -> (usize, Line) {
    let started = Instant::now();
    loop {
        {
            let lines = log.lock().unwrap();
            if let Some((i, line)) = lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| l.event == "acquired" && Some(l.node.as_str()) != except)
            {
                return (i, line.clone());
            }
        }
        assert!(
            started.elapsed() < limit,
            "no new leader within {limit:?}: {:?}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One interval per term: from `acquired` to the last deadline the holder reported, cut short
/// by its `lost`/`released` line.
fn check_terms(lines: &[Line]) {
    let mut terms: Vec<(u64, String, i128, i128)> = Vec::new();
    for line in lines {
        match line.event.as_str() {
            "acquired" => terms.push((
                line.token,
                line.node.clone(),
                line.mono_ns,
                line.valid_until_mono_ns.unwrap(),
            )),
            "renewed" => {
                let term = terms
                    .iter_mut()
                    .find(|t| t.0 == line.token && t.1 == line.node)
                    .unwrap();
                term.3 = term.3.max(line.valid_until_mono_ns.unwrap());
            }
            "lost" | "released" => {
                let term = terms
                    .iter_mut()
                    .find(|t| t.0 == line.token && t.1 == line.node)
                    .unwrap();
                term.3 = term.3.min(line.mono_ns);
            }
            other => panic!("unexpected event {other}"),
        }
    }
    terms.sort_by_key(|t| t.2);
    for pair in terms.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            b.0 > a.0,
            "token {} of {} after token {} of {}",
            b.0,
            b.1,
            a.0,
            a.1
        );
        assert!(
            a.3 <= b.2,
            "terms overlap: {} (token {}) valid until {} but {} (token {}) led from {}",
            a.1,
            a.0,
            a.3,
            b.1,
            b.0,
            b.2
        );
    }
    assert!(terms.len() >= 4, "expected at least four terms: {terms:?}");
}

#[test]
fn paused_killed_and_stopped_leaders_never_overlap_their_successors() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let redis = runtime.block_on(RedisServer::start()).unwrap();
    let url = redis.url();
    let log = Arc::new(Mutex::new(Vec::new()));
    let nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|n| spawn(&url, n, &log))
        .collect();
    let find = |nodes: &[Node], name: &str| nodes.iter().position(|n| n.name == name).unwrap();

    // 1. Pause the leader (SIGSTOP) past its TTL: another takes over; resume it.
    let (at, first) = wait_acquired(&log, 0, None, Duration::from_secs(10));
    let paused = find(&nodes, &first.node);
    nodes[paused].signal(Signal::SIGSTOP);
    let (at, second) = wait_acquired(&log, at + 1, Some(&first.node), Duration::from_secs(10));
    nodes[paused].signal(Signal::SIGCONT);

    // 2. Crash the new leader (SIGKILL): another takes over after the TTL.
    let crashed = find(&nodes, &second.node);
    nodes[crashed].signal(Signal::SIGKILL);
    let (at, third) = wait_acquired(&log, at + 1, Some(&second.node), Duration::from_secs(10));

    // 3. Stop the leader gracefully (SIGTERM): it releases, another takes over at once.
    let stopped = find(&nodes, &third.node);
    let sent = Instant::now();
    nodes[stopped].signal(Signal::SIGTERM);
    let (_, fourth) = wait_acquired(&log, at + 1, Some(&third.node), Duration::from_secs(10));
    let handover = sent.elapsed();
    assert!(
        handover < Duration::from_millis(1500),
        "graceful handover took {handover:?}"
    );
    let _ = fourth;

    // The resumed node must report that it lost leadership (its deadline passed while it was
    // stopped); then stop everyone and check the whole record.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.node == first.node && l.event == "lost")
    {
        assert!(
            Instant::now() < deadline,
            "the paused leader never reported its loss: {:?}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(nodes);
    let lines = log.lock().unwrap().clone();
    check_terms(&lines);
    drop(redis);
}
