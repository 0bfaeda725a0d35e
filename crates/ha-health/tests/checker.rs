//! The scheduler on paused time: thresholds, dependency suppression, timeouts, skipped ticks,
//! bounded concurrency, anomalies and φ suspicion, groups and the report.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ha_core::{Component, ComponentContext, Criticality, EventBus, HaEvent, Status};
use ha_health::threshold::Outcome;
use ha_health::{CheckConfig, CheckResult, CheckerConfig, Error, HealthCheck, HealthChecker};
use tokio::time::Instant;

/// A check whose outcome and latency the test sets, which records when each run started
/// and how many runs overlap.
#[derive(Clone)]
struct Scripted {
    name: &'static str,
    script: Arc<Mutex<Script>>,
    starts: Arc<Mutex<Vec<Instant>>>,
    running: Arc<AtomicUsize>,
    max_running: Arc<AtomicUsize>,
}

struct Script {
    outcome: Outcome,
    /// `None`: never finishes.
    latency: Option<Duration>,
}

impl Scripted {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            script: Arc::new(Mutex::new(Script {
                outcome: Outcome::Healthy,
                latency: Some(Duration::from_millis(10)),
            })),
            starts: Arc::default(),
            running: Arc::default(),
            max_running: Arc::default(),
        }
    }

    fn set(&self, outcome: Outcome) {
        self.script.lock().unwrap().outcome = outcome;
    }

    fn set_latency(&self, latency: Option<Duration>) {
        self.script.lock().unwrap().latency = latency;
    }

    fn runs(&self) -> usize {
        self.starts.lock().unwrap().len()
    }
}

struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl HealthCheck for Scripted {
    fn name(&self) -> &str {
        self.name
    }

    async fn check(&self) -> CheckResult {
        self.starts.lock().unwrap().push(Instant::now());
        let now_running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now_running, Ordering::SeqCst);
        let _running = Running(self.running.clone());
        let (outcome, latency) = {
            let s = self.script.lock().unwrap();
            (s.outcome, s.latency)
        };
        match latency {
            Some(l) => tokio::time::sleep(l).await,
            None => std::future::pending().await,
        }
        CheckResult::new(outcome, format!("{outcome:?}"))
    }
}

fn every(ms: u64) -> CheckConfig {
    CheckConfig::default()
        .interval(Duration::from_millis(ms))
        .timeout(Duration::from_millis(ms / 2))
}

/// Waits (in paused time) until `f` holds, failing after `limit` of virtual time.
async fn until(limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn health_changes(
    events: &mut ha_core::EventSubscriber,
) -> Vec<(String, Status, Status, Option<String>)> {
    let mut out = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let HaEvent::HealthChanged {
            component,
            from,
            to,
            cause,
            ..
        } = e
        {
            out.push((component, from, to, cause));
        }
    }
    out
}

fn anomalies(events: &mut ha_core::EventSubscriber) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let HaEvent::AnomalyDetected {
            component, rule, ..
        } = e
        {
            out.push((component, rule));
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn starts_unknown_at_once_then_debounces_by_thresholds() {
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let db = Scripted::new("db");
    let checker = HealthChecker::builder()
        .check(db.clone(), every(1000).thresholds(3, 2))
        .build()
        .unwrap();
    checker
        .start(ComponentContext::standalone("local").with_bus(bus.clone()))
        .await
        .unwrap();
    // start returned without running anything.
    assert_eq!(checker.status(), Status::Unknown);
    assert_eq!(db.runs(), 0);

    until(Duration::from_secs(2), || {
        checker.status() == Status::Healthy
    })
    .await;
    assert_eq!(
        db.runs(),
        2,
        "the success threshold (2) applies when leaving Unknown too"
    );
    let _ = health_changes(&mut events);

    db.set(Outcome::Unhealthy);
    let runs = db.runs();
    until(Duration::from_secs(10), || {
        checker.status() == Status::Unhealthy
    })
    .await;
    assert_eq!(
        db.runs() - runs,
        3,
        "unhealthy at exactly the third failure"
    );
    assert_eq!(
        health_changes(&mut events),
        [(
            "db".into(),
            Status::Healthy,
            Status::Unhealthy,
            Some("Unhealthy".into())
        )]
    );

    db.set(Outcome::Healthy);
    let runs = db.runs();
    until(Duration::from_secs(10), || {
        checker.status() == Status::Healthy
    })
    .await;
    assert_eq!(
        db.runs() - runs,
        2,
        "healthy again at exactly the second pass"
    );
    assert_eq!(
        health_changes(&mut events),
        [("db".into(), Status::Unhealthy, Status::Healthy, None)]
    );
    checker.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_down_dependency_is_named_once_as_the_root_cause() {
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let db = Scripted::new("db");
    let api = Scripted::new("api");
    let web = Scripted::new("web");
    // Registered out of order: the report must still list dependencies first.
    let checker = HealthChecker::builder()
        .check(web.clone(), every(1000).depends_on("api"))
        .check(api.clone(), every(1000).depends_on("db"))
        .check(db.clone(), every(1000).thresholds(1, 1))
        .build()
        .unwrap();
    checker
        .start(ComponentContext::standalone("local").with_bus(bus.clone()))
        .await
        .unwrap();
    until(Duration::from_secs(3), || {
        checker.status() == Status::Healthy
    })
    .await;
    let names: Vec<_> = checker
        .report()
        .checks
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["db", "api", "web"]);
    let _ = health_changes(&mut events);

    db.set(Outcome::Unhealthy);
    until(Duration::from_secs(3), || {
        checker.status() == Status::Unhealthy
    })
    .await;
    let changes = health_changes(&mut events);
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert_eq!(
        changes[0],
        (
            "db".into(),
            Status::Healthy,
            Status::Unhealthy,
            Some("Unhealthy".into())
        )
    );
    for (name, change) in ["api", "web"].iter().zip(&changes[1..]) {
        assert_eq!(change.0, *name);
        assert_eq!(change.3.as_deref(), Some("dependency db is unhealthy"));
    }
    let report = checker.report();
    assert_eq!(report.checks[2].status, Status::Unhealthy);
    assert_eq!(
        report.checks[2].check_status,
        Status::Healthy,
        "web itself still passes"
    );

    db.set(Outcome::Healthy);
    until(Duration::from_secs(3), || {
        checker.status() == Status::Healthy
    })
    .await;
    let changes = health_changes(&mut events);
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert!(
        changes
            .iter()
            .all(|c| c.2 == Status::Healthy && c.3.is_none())
    );
}

#[tokio::test(start_paused = true)]
async fn a_hung_check_times_out_and_delays_no_other() {
    let hung = Scripted::new("hung");
    hung.set_latency(None);
    let steady = Scripted::new("steady");
    let checker = HealthChecker::builder()
        .check(hung.clone(), every(1000))
        .check(steady.clone(), every(1000))
        .build()
        .unwrap();
    checker
        .start(ComponentContext::standalone("local"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    let report = checker.report();
    assert_eq!(report.checks[0].status, Status::Unhealthy);
    assert_eq!(
        report.checks[0].last_error.as_deref(),
        Some("timed out after 500ms")
    );
    assert_eq!(
        report.checks[0].latency_ms.p50, None,
        "a timeout is no latency sample"
    );
    // `steady` ran at start and then on every tick of its (phase-shifted) schedule.
    let starts = steady.starts.lock().unwrap().clone();
    assert!(starts.len() >= 10, "{} runs", starts.len());
    for pair in starts[1..].windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            Duration::from_secs(1),
            "steady kept its schedule"
        );
    }
    assert_eq!(
        hung.max_running.load(Ordering::SeqCst),
        1,
        "timed-out runs never overlap"
    );
    assert!(
        hung.runs() >= 10,
        "the hung check kept its own schedule: {} runs",
        hung.runs()
    );
    checker.stop().await.unwrap();
    assert_eq!(
        hung.running.load(Ordering::SeqCst),
        0,
        "every hung run was cancelled"
    );
}

#[tokio::test(start_paused = true)]
async fn concurrency_is_bounded_and_missed_ticks_are_skipped() {
    // Two checks that each take 400 ms of a 500 ms interval share one slot: demand is 160 %
    // of capacity, so ticks must be skipped rather than queue up.
    let a = Scripted::new("a");
    let b = Scripted::new("b");
    a.set_latency(Some(Duration::from_millis(400)));
    b.set_latency(Some(Duration::from_millis(400)));
    let checker = HealthChecker::builder()
        .config(CheckerConfig {
            max_concurrent_checks: 1,
        })
        .check(
            a.clone(),
            every(1000)
                .timeout(Duration::from_millis(450))
                .interval(Duration::from_millis(500)),
        )
        .check(
            b.clone(),
            every(1000)
                .timeout(Duration::from_millis(450))
                .interval(Duration::from_millis(500)),
        )
        .build()
        .unwrap();
    checker
        .start(ComponentContext::standalone("local"))
        .await
        .unwrap();
    let running = [a.running.clone(), b.running.clone()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let total: usize = running.iter().map(|r| r.load(Ordering::SeqCst)).sum();
        assert!(total <= 1, "{total} checks ran at once with one slot");
        tokio::time::sleep(Duration::from_millis(7)).await;
    }
    let runs = a.runs() + b.runs();
    // 10 s of one slot at 400 ms a run fits at most 25 runs (+1 in flight).
    assert!((20..=26).contains(&runs), "{runs} runs");
    assert!(
        checker
            .report()
            .checks
            .iter()
            .all(|c| c.status == Status::Healthy)
    );
}

#[tokio::test(start_paused = true)]
async fn slow_runs_are_anomalies_not_status_changes_and_phi_suspects_before_failure() {
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let svc = Scripted::new("svc");
    let mut config = every(1000);
    config.baseline.min_samples = 5;
    let checker = HealthChecker::builder()
        .check(svc.clone(), config)
        .build()
        .unwrap();
    checker
        .start(ComponentContext::standalone("local").with_bus(bus.clone()))
        .await
        .unwrap();
    until(Duration::from_secs(8), || svc.runs() >= 6).await;
    assert_eq!(anomalies(&mut events), []);

    svc.set_latency(Some(Duration::from_millis(200)));
    let runs = svc.runs();
    until(Duration::from_secs(3), || svc.runs() > runs).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let found = anomalies(&mut events);
    assert!(
        found.contains(&("svc".into(), "latency_over_p95".into())),
        "{found:?}"
    );
    assert_eq!(checker.status(), Status::Healthy, "slow is not down");

    // Now every run times out: φ rises with the silence and is reported before the status
    // flips at the third failure.
    svc.set_latency(None);
    let mut order = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !order.iter().any(|e: &String| e == "unhealthy") {
        assert!(Instant::now() < deadline, "no failure: {order:?}");
        match tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            HaEvent::AnomalyDetected { rule, .. } => order.push(rule),
            HaEvent::HealthChanged { to, .. } => order.push(to.to_string()),
            _ => {}
        }
    }
    let suspected = order.iter().position(|e| e == "phi_suspected").unwrap();
    let failed = order.iter().position(|e| e == "unhealthy").unwrap();
    assert!(suspected < failed, "{order:?}");
    assert_eq!(checker.report().checks[0].suspicion.as_str(), "failed");
}

#[tokio::test(start_paused = true)]
async fn groups_and_criticality_roll_up_and_the_report_serializes() {
    let core = Scripted::new("core");
    let cache = Scripted::new("cache");
    cache.set(Outcome::Unhealthy);
    let checker = HealthChecker::builder()
        .check(
            core.clone(),
            every(1000).group("liveness").group("readiness"),
        )
        .check(
            cache.clone(),
            every(1000)
                .thresholds(1, 1)
                .criticality(Criticality::Low)
                .group("readiness"),
        )
        .build()
        .unwrap();
    checker
        .start(ComponentContext::standalone("local"))
        .await
        .unwrap();
    until(Duration::from_secs(3), || {
        checker.check_status("cache") == Some(Status::Unhealthy)
    })
    .await;
    until(Duration::from_secs(3), || {
        checker.check_status("core") == Some(Status::Healthy)
    })
    .await;
    assert_eq!(checker.status(), Status::Degraded);
    assert_eq!(checker.group_status("liveness"), Some(Status::Healthy));
    assert_eq!(checker.group_status("readiness"), Some(Status::Degraded));
    assert_eq!(checker.group_status("nope"), None);

    let json = serde_json::to_value(checker.report()).unwrap();
    assert_eq!(json["status"], "degraded");
    assert_eq!(json["groups"]["readiness"], "degraded");
    assert_eq!(json["checks"][1]["name"], "cache");
    assert_eq!(json["checks"][1]["cause"], "Unhealthy");
    assert_eq!(json["checks"][1]["criticality"], "low");
    assert!(json["checks"][0]["latency_ms"]["p50"].as_f64().unwrap() >= 10.0);
    assert!(json["generated_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_every_check() {
    let a = Scripted::new("a");
    let checker = HealthChecker::builder()
        .check(a.clone(), every(100))
        .build()
        .unwrap();
    checker
        .start(ComponentContext::standalone("local"))
        .await
        .unwrap();
    until(Duration::from_secs(1), || a.runs() >= 3).await;
    checker.stop().await.unwrap();
    let runs = a.runs();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(a.runs(), runs);
}

#[tokio::test(start_paused = true)]
async fn built_it_reports_unknown_until_started_once_and_the_node_shutdown_stops_it() {
    let a = Scripted::new("a");
    let checker = HealthChecker::builder()
        .check(a.clone(), every(100))
        .build()
        .unwrap();
    assert_eq!(checker.name(), "health");
    assert_eq!(Component::status(&checker), Status::Unknown);
    let report = checker.report();
    assert_eq!(report.checks.len(), 1);
    assert_eq!(report.checks[0].status, Status::Unknown);
    assert_eq!(report.node, "");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a.runs(), 0, "nothing runs before start");

    let ctx = ComponentContext::standalone("n1");
    checker.start(ctx.clone()).await.unwrap();
    assert!(
        checker.start(ctx.clone()).await.is_err(),
        "a second start is refused"
    );
    until(Duration::from_secs(1), || a.runs() >= 3).await;
    assert_eq!(checker.report().node, "n1");
    assert_eq!(Component::status(&checker), Status::Healthy);

    ctx.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let runs = a.runs();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(a.runs(), runs);
    checker.stop().await.unwrap();
}

#[tokio::test]
async fn bad_registrations_are_refused_with_names() {
    let err = |b: ha_health::HealthCheckerBuilder| b.build().err().unwrap();
    let e = err(HealthChecker::builder()
        .check(Scripted::new("a"), every(1000).depends_on("b"))
        .check(Scripted::new("b"), every(1000).depends_on("a")));
    assert!(
        matches!(&e, Error::DependencyCycle { cycle } if cycle.len() == 2),
        "{e}"
    );
    let e = err(HealthChecker::builder().check(Scripted::new("a"), every(1000).depends_on("zz")));
    assert_eq!(
        e.to_string(),
        "check `a` depends on `zz`, which is not registered"
    );
    let e = err(HealthChecker::builder().check(
        Scripted::new("a"),
        every(1000).timeout(Duration::from_secs(5)),
    ));
    assert!(
        e.to_string()
            .starts_with("invalid config of check `a`: invalid config: `timeout`"),
        "{e}"
    );
    let e = err(HealthChecker::builder()
        .check(Scripted::new("a"), every(1000))
        .check(Scripted::new("a"), every(1000)));
    assert!(matches!(e, Error::DuplicateCheck { .. }));
}
