//! The checker driving real checks against real servers with real faults: a killed
//! redis-server goes unhealthy at exactly the failure threshold and recovers at exactly the
//! success threshold after a restart; a SIGSTOPped PostgreSQL makes its check time out while
//! another check keeps its schedule; latency injected by a proxy raises a latency anomaly,
//! and then φ suspicion before the hard failure.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ha_core::{Component, ComponentContext, EventBus, EventSubscriber, HaEvent, Status};
use ha_health::{
    CheckConfig, CheckReport, CheckResult, FnCheck, HealthChecker, PostgresCheck, RedisCheck,
};
use ha_testkit::{FaultProxy, PostgresServer, ProxyMode, RedisServer};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(20);

fn every(ms: u64) -> CheckConfig {
    CheckConfig::default()
        .interval(Duration::from_millis(ms))
        .timeout(Duration::from_millis(ms * 2 / 3))
}

/// The next event that `pick` accepts, within `WAIT`; the rest are passed over.
async fn next<T>(events: &mut EventSubscriber, mut pick: impl FnMut(&HaEvent) -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("expected event did not come in time")
            .unwrap();
        if let Some(found) = pick(&event) {
            return found;
        }
    }
}

fn changed_to(check: &'static str, to: Status) -> impl FnMut(&HaEvent) -> Option<()> {
    move |e| match e {
        HaEvent::HealthChanged {
            component, to: t, ..
        } if component == check && *t == to => Some(()),
        _ => None,
    }
}

fn report_of(checker: &HealthChecker, name: &str) -> CheckReport {
    checker
        .report()
        .checks
        .into_iter()
        .find(|c| c.name == name)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis_is_unhealthy_at_the_threshold_and_recovers_after_restart() {
    let mut redis = RedisServer::start().await.unwrap();
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let check = RedisCheck::connect("redis", &redis.url()).await.unwrap();
    let checker = HealthChecker::builder()
        .check(check, every(500).thresholds(3, 2))
        .build()
        .unwrap();
    checker
        .start(ComponentContext::standalone("local").with_bus(bus.clone()))
        .await
        .unwrap();
    next(&mut events, changed_to("redis", Status::Healthy)).await;

    redis.kill().unwrap();
    next(&mut events, changed_to("redis", Status::Unhealthy)).await;
    // The next run is 500 ms away: the streak read now is the one that flipped the status.
    let report = report_of(&checker, "redis");
    assert_eq!(report.consecutive_failures, 3, "{report:?}");
    assert!(report.last_error.is_some());

    redis.restart().await.unwrap();
    next(&mut events, changed_to("redis", Status::Healthy)).await;
    let report = report_of(&checker, "redis");
    assert_eq!(report.consecutive_successes, 2, "{report:?}");
    assert!(report.last_detail.unwrap().contains("role=master"));
    checker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_postgres_times_out_while_other_checks_keep_their_schedule() {
    let pg = PostgresServer::start().await.unwrap();
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let starts = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let noted = starts.clone();
    let steady = FnCheck::new("steady", move || {
        let noted = noted.clone();
        async move {
            noted.lock().unwrap().push(Instant::now());
            CheckResult::healthy("ok")
        }
    });
    let checker = HealthChecker::builder()
        .check(
            PostgresCheck::connect("postgres", &pg.url()).await.unwrap(),
            every(300),
        )
        .check(steady, every(300))
        .build()
        .unwrap();
    checker
        .start(ComponentContext::standalone("local").with_bus(bus.clone()))
        .await
        .unwrap();
    next(&mut events, changed_to("postgres", Status::Healthy)).await;

    pg.pause().unwrap();
    let paused_at = Instant::now();
    next(&mut events, changed_to("postgres", Status::Unhealthy)).await;
    let report = report_of(&checker, "postgres");
    pg.resume().unwrap();
    assert_eq!(report.last_error.as_deref(), Some("timed out after 200ms"));

    // While PostgreSQL hung, `steady` started a run on every tick: no gap reached two
    // intervals (which would mean a skipped tick).
    let starts = starts.lock().unwrap().clone();
    let during: Vec<_> = starts.iter().filter(|&&t| t >= paused_at).collect();
    assert!(during.len() >= 3, "{} runs while paused", during.len());
    for pair in during.windows(2) {
        let gap = *pair[1] - *pair[0];
        assert!(
            gap < Duration::from_millis(600),
            "steady skipped a tick: {gap:?}"
        );
    }
    next(&mut events, changed_to("postgres", Status::Healthy)).await;
    checker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_latency_is_an_anomaly_then_phi_suspects_before_the_failure() {
    let redis = RedisServer::start().await.unwrap();
    let proxy = FaultProxy::start(redis.addr()).unwrap();
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let mut config = every(200);
    config.baseline.min_samples = 5;
    let check = RedisCheck::connect("redis", &format!("redis://{}", proxy.addr()))
        .await
        .unwrap();
    let checker = HealthChecker::builder()
        .check(check, config)
        .build()
        .unwrap();
    checker
        .start(ComponentContext::standalone("local").with_bus(bus.clone()))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while report_of(&checker, "redis").runs < 8 {
        assert!(Instant::now() < deadline, "redis check did not run");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(checker.check_status("redis"), Some(Status::Healthy));

    // 10 ms each way: PING takes ≥ 20 ms instead of well under 1 ms, still inside the timeout.
    proxy.set_mode(ProxyMode::Latency(Duration::from_millis(10)));
    let rule = next(&mut events, |e| match e {
        HaEvent::AnomalyDetected {
            component, rule, ..
        } if component == "redis" => Some(rule.clone()),
        _ => None,
    })
    .await;
    // Any of the latency rules may see it first (on a loaded machine the rising median of
    // `trend` can beat the p95 and EWMA rules); a non-latency rule would be wrong.
    assert!(
        ["latency_over_p95", "ewma_z_score", "trend"].contains(&rule.as_str()),
        "{rule}"
    );
    assert_eq!(
        checker.check_status("redis"),
        Some(Status::Healthy),
        "slow is not down"
    );

    // Far past the timeout: every run fails. φ must speak before the status flips.
    proxy.set_mode(ProxyMode::Latency(Duration::from_secs(2)));
    let mut seen = Vec::new();
    while !seen.contains(&"unhealthy".to_owned()) {
        let e = next(&mut events, |e| match e {
            HaEvent::AnomalyDetected {
                component, rule, ..
            } if component == "redis" => Some(rule.clone()),
            HaEvent::HealthChanged { component, to, .. } if component == "redis" => {
                Some(to.to_string())
            }
            _ => None,
        })
        .await;
        seen.push(e);
    }
    // Depending on where the failures fall between ticks, φ may jump straight to `failed`.
    let suspected = seen
        .iter()
        .position(|e| e == "phi_suspected" || e == "phi_failed");
    let failed = seen.iter().position(|e| e == "unhealthy").unwrap();
    assert!(suspected.is_some_and(|s| s < failed), "{seen:?}");
    checker.stop().await.unwrap();
}
