#![allow(clippy::unwrap_used)]

//! The built-in checks against real things: private `redis-server` and PostgreSQL processes
//! from `ha-testkit`, local TCP and HTTP listeners, child processes, and this machine's disk,
//! memory and CPU.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ha_health::checks::{
    CommandCheck, CpuCheck, DiskCheck, FnCheck, HttpCheck, MemoryCheck, PostgresCheck, RedisCheck,
    RedisRole, TcpCheck, UsageThresholds,
};
use ha_health::{CheckResult, Error, HealthCheck, Outcome};
use ha_testkit::{PostgresServer, RedisServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How long a check on a dead server may take before we call it hanging.
const DEAD_SERVER_BOUND: Duration = Duration::from_secs(5);

/// Runs `check` once, failing the test if it takes longer than [`DEAD_SERVER_BOUND`].
async fn bounded(check: &dyn HealthCheck) -> CheckResult {
    let started = Instant::now();
    match tokio::time::timeout(DEAD_SERVER_BOUND, check.check()).await {
        Ok(result) => result,
        Err(_) => panic!("check `{}` hung for {:?}", check.name(), started.elapsed()),
    }
}

/// Polls `probe` until it returns `Some`, failing the test after `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_outcome(result: &CheckResult, outcome: Outcome) {
    assert_eq!(result.outcome, outcome, "{result}");
}

/// The field a config error names.
fn config_field(error: Error) -> String {
    match error {
        Error::Config { source, .. } => source.field,
        other => panic!("expected a config error, got {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// `DBSIZE` and the number of writes since the last save: both stay 0 if nothing was written.
async fn redis_writes(server: &RedisServer) -> (i64, String) {
    let size = server.command(&["DBSIZE"]).await.unwrap().as_int().unwrap();
    let info = server.command(&["INFO", "persistence"]).await.unwrap();
    let info = info.as_str().unwrap().to_owned();
    let dirty = ha_testkit::redis::info_field(&info, "rdb_changes_since_last_save")
        .unwrap()
        .to_owned();
    (size, dirty)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_master_is_healthy_and_nothing_is_written() {
    let server = RedisServer::start().await.unwrap();
    assert_eq!(redis_writes(&server).await, (0, "0".to_owned()));
    let check = RedisCheck::connect("cache", &server.url())
        .await
        .unwrap()
        .expect_role(RedisRole::Master);
    for _ in 0..5 {
        let result = check.check().await;
        assert_outcome(&result, Outcome::Healthy);
        assert_eq!(result.detail, "role=master replicas=0");
        assert!(result.latency.is_some());
    }
    assert_eq!(redis_writes(&server).await, (0, "0".to_owned()));

    let replica_expected = RedisCheck::connect("cache", &server.url())
        .await
        .unwrap()
        .expect_role(RedisRole::Replica);
    let result = replica_expected.check().await;
    assert_outcome(&result, Outcome::Unhealthy);
    assert!(result.detail.contains("expected role=slave"), "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_replica_reports_its_master_and_link() {
    let mut master = RedisServer::start().await.unwrap();
    let replica = RedisServer::builder()
        .replica_of(master.addr())
        .start()
        .await
        .unwrap();
    let check = RedisCheck::connect("replica", &replica.url())
        .await
        .unwrap();
    let result = check.check().await;
    assert_outcome(&result, Outcome::Healthy);
    assert_eq!(
        result.detail,
        format!(
            "role=slave master=127.0.0.1:{} link=connected",
            master.port()
        )
    );
    let result = check.check().await;
    assert_eq!(result.outcome, Outcome::Healthy);

    let as_master = RedisCheck::connect("replica", &replica.url())
        .await
        .unwrap()
        .expect_role(RedisRole::Master);
    let result = as_master.check().await;
    assert_outcome(&result, Outcome::Unhealthy);
    assert!(result.detail.contains("expected role=master"), "{result}");
    let as_replica = RedisCheck::connect("replica", &replica.url())
        .await
        .unwrap()
        .expect_role(RedisRole::Replica);
    assert_outcome(&as_replica.check().await, Outcome::Healthy);

    // The master dies: the replica still answers, but serves stale data.
    master.kill().unwrap();
    let degraded = eventually("replica link down", Duration::from_secs(10), || async {
        let result = check.check().await;
        (result.outcome == Outcome::Degraded).then_some(result)
    })
    .await;
    assert!(!degraded.detail.contains("link=connected"), "{degraded}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_check_on_a_killed_server_fails_fast() {
    let mut server = RedisServer::start().await.unwrap();
    let check = RedisCheck::connect("cache", &server.url()).await.unwrap();
    assert_outcome(&check.check().await, Outcome::Healthy);
    server.kill().unwrap();
    for _ in 0..3 {
        let result = bounded(&check).await;
        assert_outcome(&result, Outcome::Unhealthy);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_check_accepts_the_applications_client() {
    use fred::prelude::{Client, ClientLike, Config};

    let mut server = RedisServer::start().await.unwrap();
    let client = Client::new(Config::from_url(&server.url()).unwrap(), None, None, None);
    let connection = client.init().await.unwrap();
    let check = RedisCheck::new("cache", client.clone()).command_timeout(Duration::from_secs(1));
    assert_outcome(&check.check().await, Outcome::Healthy);
    // fred's default reconnect policy is none, and its default command timeout unbounded:
    // the check's own options must still make it fail fast.
    server.kill().unwrap();
    assert_outcome(&bounded(&check).await, Outcome::Unhealthy);
    connection.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connect_reports_an_unreachable_server_or_a_bad_url() {
    let port = closed_port().await;
    let started = Instant::now();
    let err = RedisCheck::connect("cache", &format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < DEAD_SERVER_BOUND,
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(&err, Error::Connect { check, .. } if check == "cache"),
        "{err}"
    );
    assert!(err.is_retryable());

    let err = RedisCheck::connect("cache", "http://nope")
        .await
        .unwrap_err();
    assert_eq!(config_field(err), "url");
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_primary_is_healthy_and_the_pool_is_reused() {
    let server = PostgresServer::start().await.unwrap();
    let check = PostgresCheck::connect("pg-main", &server.url())
        .await
        .unwrap()
        .expect_primary();
    for _ in 0..20 {
        let result = check.check().await;
        assert_outcome(&result, Outcome::Healthy);
        assert!(result.detail.starts_with("primary, "), "{result}");
        assert!(result.detail.ends_with(" connections"), "{result}");
        assert!(result.latency.is_some());
    }
    let ours: i64 = server
        .query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ha-health/pg-main'",
        )
        .await
        .unwrap();
    assert!((1..=2).contains(&ours), "{ours} connections for 20 runs");

    // Our own connection is at least one: any usage crosses a tiny threshold.
    let crowded = PostgresCheck::connect("pg-crowded", &server.url())
        .await
        .unwrap()
        .degraded_at_connections_percent(0.001)
        .unwrap();
    let result = crowded.check().await;
    assert_outcome(&result, Outcome::Degraded);
    assert!(result.detail.contains("degraded at 0.001%"), "{result}");

    let as_replica = PostgresCheck::connect("pg-main", &server.url())
        .await
        .unwrap()
        .expect_replica();
    let result = as_replica.check().await;
    assert_outcome(&result, Outcome::Unhealthy);
    assert!(result.detail.contains("expected replica"), "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replica_is_reported_and_a_killed_one_fails_fast() {
    let primary = PostgresServer::start().await.unwrap();
    let mut replica = primary.start_replica().await.unwrap();
    let check = PostgresCheck::connect("pg-replica", &replica.url())
        .await
        .unwrap();
    let result = check.check().await;
    assert_outcome(&result, Outcome::Healthy);
    assert!(result.detail.starts_with("replica, "), "{result}");
    let expecting_replica = PostgresCheck::connect("pg-replica", &replica.url())
        .await
        .unwrap()
        .expect_replica();
    assert_outcome(&expecting_replica.check().await, Outcome::Healthy);
    let expecting_primary = PostgresCheck::connect("pg-replica", &replica.url())
        .await
        .unwrap()
        .expect_primary();
    let result = expecting_primary.check().await;
    assert_outcome(&result, Outcome::Unhealthy);
    assert!(result.detail.contains("expected primary"), "{result}");

    replica.kill().unwrap();
    let result = bounded(&check).await;
    assert_outcome(&result, Outcome::Unhealthy);
    assert!(
        result.detail.contains("no connection within 3s"),
        "{result}"
    );
}

#[tokio::test]
async fn postgres_config_errors_name_the_field() {
    for url in ["mysql://x", "postgres://host:notaport/db"] {
        let err = PostgresCheck::connect("pg", url).await.unwrap_err();
        assert_eq!(config_field(err), "url", "{url}");
    }
    let check = PostgresCheck::connect("pg", "postgres://postgres@127.0.0.1:1/postgres")
        .await
        .unwrap();
    let err = check.degraded_at_connections_percent(0.0).unwrap_err();
    assert_eq!(config_field(err), "degraded_at_connections_percent");
}

// ---------------------------------------------------------------------------------------------
// TCP
// ---------------------------------------------------------------------------------------------

/// A loopback port that nothing listens on (bound, then released).
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn tcp_check_follows_the_listener() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let check = TcpCheck::new("port", addr.to_string()).unwrap();
    let result = check.check().await;
    assert_outcome(&result, Outcome::Healthy);
    assert_eq!(result.detail, format!("connected to {addr}"));
    assert!(result.latency.is_some());

    let closed = TcpCheck::new("closed", format!("127.0.0.1:{}", closed_port().await)).unwrap();
    let result = bounded(&closed).await;
    assert_outcome(&result, Outcome::Unhealthy);
    assert!(result.detail.contains("refused"), "{result}");

    assert_eq!(
        config_field(TcpCheck::new("bad", "localhost").unwrap_err()),
        "target"
    );
    assert_eq!(
        config_field(TcpCheck::new("bad", ":80").unwrap_err()),
        "target"
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// A tiny HTTP/1.1 server answering every request with `status` and a short body, keeping
/// connections open. Returns its address and the number of connections it accepted.
async fn http_server(status: &'static str) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                    // One response per complete request head (GETs have no body).
                    while let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        request.drain(..end + 4);
                        let response = format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"
                        );
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn http_check_judges_the_status_and_reuses_its_connection() {
    let (addr, accepted) = http_server("200 OK").await;
    let check = HttpCheck::new("api", &format!("http://{addr}/healthz"))
        .unwrap()
        .timeout(Duration::from_secs(5));
    for _ in 0..3 {
        let result = check.check().await;
        assert_outcome(&result, Outcome::Healthy);
        assert_eq!(result.detail, "HTTP 200 OK");
        assert!(result.latency.is_some());
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one kept-alive connection"
    );

    let (addr, _) = http_server("503 Service Unavailable").await;
    let url = format!("http://{addr}/healthz");
    let result = HttpCheck::new("api", &url).unwrap().check().await;
    assert_outcome(&result, Outcome::Unhealthy);
    assert_eq!(
        result.detail,
        "HTTP 503 Service Unavailable, expected 200-299"
    );
    let maintenance = HttpCheck::new("api", &url)
        .unwrap()
        .expect_status(503..=503)
        .unwrap();
    assert_outcome(&maintenance.check().await, Outcome::Healthy);
}

#[tokio::test]
async fn http_check_fails_on_a_closed_port_and_rejects_bad_config() {
    let url = format!("http://127.0.0.1:{}/", closed_port().await);
    let result = bounded(&HttpCheck::new("api", &url).unwrap()).await;
    assert_outcome(&result, Outcome::Unhealthy);
    assert!(result.detail.contains("refused"), "{result}");

    let field = |r: Result<HttpCheck, Error>| config_field(r.unwrap_err());
    assert_eq!(field(HttpCheck::new("api", "https://example.com/")), "url");
    assert_eq!(field(HttpCheck::new("api", "not a url")), "url");
    #[allow(clippy::reversed_empty_ranges)]
    let empty = 300..=200;
    assert_eq!(
        field(HttpCheck::new("api", &url).unwrap().expect_status(empty)),
        "expected_status"
    );
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn command_exit_codes_map_to_outcomes() {
    let none: [&str; 0] = [];
    assert_outcome(
        &CommandCheck::new("t", "true", none).check().await,
        Outcome::Healthy,
    );
    let result = CommandCheck::new("f", "false", none).check().await;
    assert_outcome(&result, Outcome::Unhealthy);
    assert_eq!(result.detail, "exit code 1");

    let warning = CommandCheck::new("w", "sh", ["-c", "echo 'WARNING: 81% full'; exit 1"])
        .degraded_exit_code(1);
    let result = warning.check().await;
    assert_outcome(&result, Outcome::Degraded);
    assert_eq!(result.detail, "exit code 1: WARNING: 81% full");

    let critical = CommandCheck::new("c", "sh", ["-c", "echo out; echo 'oops' >&2; exit 2"])
        .degraded_exit_code(1);
    let result = critical.check().await;
    assert_outcome(&result, Outcome::Unhealthy);
    assert_eq!(result.detail, "exit code 2: oops");

    let ok = CommandCheck::new("o", "sh", ["-c", "echo 'all good'"]);
    assert_eq!(ok.check().await.detail, "exit code 0: all good");

    let missing = CommandCheck::new("m", "/nonexistent/ha-health-probe", none);
    let result = missing.check().await;
    assert_outcome(&result, Outcome::Unhealthy);
    assert!(result.detail.starts_with("cannot run"), "{result}");
}

#[tokio::test]
async fn command_output_is_capped_without_blocking_the_child() {
    // 1 MiB on stdout: more than a pipe holds, so the child only exits if we keep reading.
    let loud = CommandCheck::new(
        "loud",
        "sh",
        ["-c", "head -c 1048576 /dev/zero | tr '\\0' x"],
    );
    let result = bounded(&loud).await;
    assert_outcome(&result, Outcome::Healthy);
    assert!(
        result.detail.chars().count() < 250,
        "{}",
        result.detail.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_command_check_kills_its_child() {
    let pidfile = std::env::temp_dir().join(format!("ha-health-cmd-{}.pid", std::process::id()));
    let _ = std::fs::remove_file(&pidfile);
    let script = format!("echo $$ > {}; exec sleep 30", pidfile.display());
    let check = CommandCheck::new("sleepy", "sh", ["-c", script.as_str()]);
    let read_pid = |path: &Path| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    };
    // Drop the run (as the scheduler does at its timeout) as soon as the child is known.
    let pid = tokio::select! {
        result = check.check() => panic!("sleep 30 finished: {result}"),
        pid = eventually("pid file", Duration::from_secs(10), || async { read_pid(&pidfile) }) => pid,
    };
    let _ = std::fs::remove_file(&pidfile);
    // Killed and reaped (Tokio reaps a dropped child in the background): no /proc entry left.
    let proc_entry = format!("/proc/{pid}");
    eventually("child killed", Duration::from_secs(5), || async {
        (!Path::new(&proc_entry).exists()).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Disk, memory, CPU
// ---------------------------------------------------------------------------------------------

/// The first `<number>%` in a detail: the reading.
fn reading(result: &CheckResult) -> f64 {
    result
        .detail
        .split_whitespace()
        .find_map(|word| word.strip_suffix('%')?.parse().ok())
        .unwrap_or_else(|| panic!("no percentage in {result}"))
}

/// Thresholds that put `percent` in the healthy, degraded and unhealthy band in turn, with
/// margins wide enough for a reading that moves a little between runs.
fn bands(percent: f64) -> [(UsageThresholds, Outcome); 3] {
    assert!(
        (1.0..99.0).contains(&percent),
        "reading {percent}% too close to an end"
    );
    let above = (percent + 100.0) / 2.0;
    [
        (UsageThresholds::new(above, 100.0), Outcome::Healthy),
        (
            UsageThresholds::new(percent / 2.0, above),
            Outcome::Degraded,
        ),
        (
            UsageThresholds::new(percent / 4.0, percent / 2.0),
            Outcome::Unhealthy,
        ),
    ]
}

#[tokio::test]
async fn disk_outcomes_follow_thresholds_around_the_real_usage() {
    let stat = nix::sys::statvfs::statvfs("/").unwrap();
    let used = (stat.blocks() - stat.blocks_free()) as f64;
    let expected = used * 100.0 / (used + stat.blocks_available() as f64);

    let result = DiskCheck::new("root", "/").check().await;
    assert!(result.detail.starts_with("/ "), "{result}");
    assert!(result.detail.contains("% used ("), "{result}");
    assert!(result.detail.contains(" free)"), "{result}");
    assert!(
        (reading(&result) - expected).abs() < 0.5,
        "{result} vs {expected:.1}%"
    );

    // Disk usage moves slowly: thresholds a margin away from the reading decide the outcome.
    let margin = 0.5_f64.min((100.0 - expected) / 3.0);
    let cases = [
        (expected + margin, expected + 2.0 * margin, Outcome::Healthy),
        (expected - margin, expected + margin, Outcome::Degraded),
        (expected / 3.0, expected - margin, Outcome::Unhealthy),
    ];
    for (degraded, unhealthy, outcome) in cases {
        let check = DiskCheck::new("root", "/")
            .thresholds(UsageThresholds::new(degraded, unhealthy))
            .unwrap();
        let result = check.check().await;
        assert_outcome(&result, outcome);
        assert!(result.latency.is_some());
    }

    let result = DiskCheck::new("missing", "/nonexistent/ha-health")
        .check()
        .await;
    assert_outcome(&result, Outcome::Unhealthy);
    assert!(result.detail.contains("statvfs failed"), "{result}");
}

#[tokio::test]
async fn memory_outcomes_follow_thresholds_around_the_real_usage() {
    let first = MemoryCheck::new("memory").check().await;
    assert!(first.detail.starts_with("memory "), "{first}");
    assert!(first.detail.contains(" available of "), "{first}");
    for (thresholds, outcome) in bands(reading(&first)) {
        let result = MemoryCheck::new("memory")
            .thresholds(thresholds)
            .unwrap()
            .check()
            .await;
        assert_outcome(&result, outcome);
    }
}

#[tokio::test]
async fn cpu_outcomes_match_the_thresholds_for_each_reading() {
    let check = CpuCheck::new("cpu");
    let first = check.check().await;
    let percent = reading(&first);
    assert!((0.0..=100.0).contains(&percent), "{first}");
    // The first run samples twice, 200 ms apart; the wait is not counted as latency.
    assert!(
        first.latency.unwrap() < Duration::from_millis(150),
        "{first:?}"
    );
    // CPU load moves too fast to aim thresholds at it: check each run's outcome against the
    // reading it reported.
    for (degraded, unhealthy) in [(99.0, 100.0), (50.0, 75.0), (0.001, 0.002)] {
        let thresholds = UsageThresholds::new(degraded, unhealthy);
        let check = CpuCheck::new("cpu").thresholds(thresholds).unwrap();
        for _ in 0..2 {
            let result = check.check().await;
            assert_outcome(&result, thresholds.outcome(reading(&result)));
        }
    }
}

#[test]
fn usage_checks_reject_invalid_thresholds_naming_the_field() {
    let bad = [
        (UsageThresholds::new(90.0, 80.0), "degraded_at_percent"),
        (UsageThresholds::new(0.0, 80.0), "degraded_at_percent"),
        (UsageThresholds::new(80.0, 100.1), "unhealthy_at_percent"),
    ];
    for (thresholds, field) in bad {
        let disk = DiskCheck::new("d", "/").thresholds(thresholds).unwrap_err();
        assert!(disk.to_string().contains("disk check"), "{disk}");
        assert_eq!(config_field(disk), field);
        let memory = MemoryCheck::new("m").thresholds(thresholds).unwrap_err();
        assert_eq!(config_field(memory), field);
        let cpu = CpuCheck::new("c").thresholds(thresholds).unwrap_err();
        assert_eq!(config_field(cpu), field);
    }
}

// ---------------------------------------------------------------------------------------------
// Closures, and all checks side by side
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn checks_of_every_kind_live_together() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let counted = FnCheck::new("counted", move || {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move { CheckResult::degraded(format!("run {n}")) }
    });
    let checks: Vec<Box<dyn HealthCheck>> = vec![
        Box::new(counted),
        Box::new(DiskCheck::new("disk", "/")),
        Box::new(MemoryCheck::new("memory")),
        Box::new(CommandCheck::new("true", "true", [""; 0])),
    ];
    let names: Vec<&str> = checks.iter().map(|c| c.name()).collect();
    assert_eq!(names, ["counted", "disk", "memory", "true"]);
    assert_eq!(checks[0].check().await.detail, "run 1");
    assert_eq!(checks[0].check().await.outcome, Outcome::Degraded);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
