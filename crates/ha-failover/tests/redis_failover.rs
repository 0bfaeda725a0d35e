//! A real failover: two real redis-server processes behind a `Router`, ha-health's checker
//! probing the primary and publishing `HealthChanged` on a bus, the failover manager listening
//! on it. The primary is SIGKILLed; the manager must switch the router within the checker's
//! failure threshold × interval (plus the last probe's timeout and some slack), and the
//! application's writes, sent wherever the router points, must then land on the survivor.

#![allow(clippy::unwrap_used)] // test: a panic is the failure report

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ha_core::{
    AlwaysLeader, Component, ComponentContext, EventBus, FencingToken, HaEvent, NodeId, Status,
};
use ha_failover::{
    ComponentConfig, FailoverManager, Outcome, Router, RouterSwitch, Target, TriggerSource,
};
use ha_health::{CheckConfig, HealthChecker, RedisCheck};
use ha_testkit::redis::{RedisServer, RespValue, command};
use tokio::time::{Instant, sleep, timeout};

const INTERVAL: Duration = Duration::from_millis(200);
const PROBE_TIMEOUT: Duration = Duration::from_millis(150);
const THRESHOLD: u32 = 3;
/// Scheduling and process-exit noise on a shared 2-core machine.
const SLACK: Duration = Duration::from_millis(500);
const WRITE_TIMEOUT: Duration = Duration::from_millis(300);

/// One write the application made: where it went, whether the server took it, and when the
/// answer (or the error) came.
#[derive(Debug, Clone)]
struct Write {
    key: String,
    to: SocketAddr,
    ok: bool,
    at: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_moves_the_applications_writes_to_the_survivor() {
    let mut primary = RedisServer::start().await.unwrap();
    let secondary = RedisServer::start().await.unwrap();
    let router = Router::new(primary.addr(), secondary.addr());

    // The node's one context: the checker publishes on its bus, the manager hears it there.
    let ctx = ComponentContext::new(
        NodeId::new("app-1"),
        EventBus::default(),
        Arc::new(AlwaysLeader::new(FencingToken(1))),
    );
    let mut events = ctx.bus.subscribe();
    let check = RedisCheck::connect("redis", &primary.url())
        .await
        .unwrap()
        .command_timeout(PROBE_TIMEOUT);
    let checker = HealthChecker::builder()
        .check(
            check,
            CheckConfig::default()
                .interval(INTERVAL)
                .timeout(PROBE_TIMEOUT)
                .thresholds(THRESHOLD, 1),
        )
        .build()
        .unwrap();
    let manager = FailoverManager::builder()
        .component(
            "redis",
            RouterSwitch::new(router.clone()),
            ComponentConfig::default(),
        )
        .build()
        .unwrap();
    // In dependency order, as the node does: the manager hears every event the checker sends.
    manager.start(ctx.clone()).await.unwrap();
    checker.start(ctx.clone()).await.unwrap();

    // The checker sees the primary up first.
    timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(HaEvent::HealthChanged {
                to: Status::Healthy,
                component,
                ..
            }) = events.recv().await
                && component == "redis"
            {
                return;
            }
        }
    })
    .await
    .expect("the primary is seen healthy");

    // The application writes through the router, every 20 ms.
    let writes = Arc::new(Mutex::new(Vec::<Write>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let app = tokio::spawn({
        let (router, writes, stop) = (router.clone(), Arc::clone(&writes), Arc::clone(&stop));
        async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let to = *router.current();
                let key = format!("order:{n}");
                let reply = command(to, &["SET", &key, &n.to_string()], WRITE_TIMEOUT).await;
                let ok = matches!(reply, Ok(RespValue::Simple(ref s)) if s == "OK");
                let at = Instant::now();
                writes.lock().unwrap().push(Write { key, to, ok, at });
                n += 1;
                sleep(Duration::from_millis(20)).await;
            }
        }
    });
    sleep(Duration::from_millis(300)).await;

    // `kill` sends SIGKILL and reaps the process: writes may fail before it returns.
    let killed = Instant::now();
    primary.kill().unwrap();
    let deadline = killed + INTERVAL * THRESHOLD + PROBE_TIMEOUT + SLACK;
    while router.active() != Target::Secondary {
        assert!(
            Instant::now() < deadline,
            "no switch within {:?}; history {:?}",
            deadline - killed,
            manager.history()
        );
        sleep(Duration::from_millis(5)).await;
    }
    let switched = Instant::now();
    eprintln!("router switched {:?} after the kill", switched - killed);

    // Let the application write to the survivor for a while, then stop it.
    sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    app.await.unwrap();

    let writes = writes.lock().unwrap().clone();
    let before: Vec<&Write> = writes.iter().filter(|w| w.at < killed).collect();
    assert!(
        !before.is_empty() && before.iter().all(|w| w.ok && w.to == primary.addr()),
        "writes answered before the kill went to the live primary: {before:?}"
    );
    let after: Vec<&Write> = writes.iter().filter(|w| w.to == secondary.addr()).collect();
    assert!(after.len() >= 10, "the application kept writing: {after:?}");
    assert!(
        after.iter().all(|w| w.ok),
        "the survivor took every write: {after:?}"
    );
    assert!(
        writes.last().unwrap().to == secondary.addr(),
        "the application ends up on the survivor"
    );
    // Read back from the survivor itself: the writes are there.
    for w in &after {
        let value = secondary.command(&["GET", &w.key]).await.unwrap();
        let n = w.key.trim_start_matches("order:");
        assert_eq!(
            value,
            RespValue::Bulk(Some(n.as_bytes().to_vec())),
            "{}",
            w.key
        );
    }

    // The history tells what happened: one completed failover, asked for by the health event,
    // under the leader's token.
    let history = manager.history();
    assert_eq!(history.len(), 1, "{history:?}");
    let record = &history[0];
    assert_eq!(record.outcome, Outcome::Completed);
    assert_eq!(record.trigger.source, TriggerSource::HealthEvent);
    assert_eq!(record.token, Some(FencingToken(1)));
    assert!(record.trigger.cause.is_some(), "{record:?}");

    checker.stop().await.unwrap();
    manager.stop().await.unwrap();
}
