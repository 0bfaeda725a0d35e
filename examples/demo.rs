//! The demo on embedded defaults: no servers needed.
//!
//! A node runs one component, a dependency whose health goes from healthy to degraded to
//! unhealthy and back, and publishes every change on the event bus. Two subscribers watch: a
//! status board that keeps the worst status, and a deliberately slow auditor on a tiny bus that
//! is told how many events it missed instead of slowing the publisher down. Leader-only work
//! asks the single-node `AlwaysLeader` gate for its fencing token.
//!
//! Run it with `cargo run --example demo`.
#![allow(clippy::print_stdout)] // printing is what this program is for

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ha_core::{
    AlwaysLeader, Backoff, BackoffConfig, EventBus, FencingToken, HaEvent, LeadershipGate, NodeId,
    RecvError, Status,
};

#[tokio::main]
async fn main() {
    ha_examples::init_tracing();
    let node = NodeId::new("demo-node");
    let bus = EventBus::default();
    let gate: Arc<dyn LeadershipGate> = Arc::new(AlwaysLeader::new(FencingToken(1)));

    // Subscriber 1: a status board, fed by every event.
    let mut board_events = bus.subscribe();
    let board = tokio::spawn(async move {
        let mut statuses: BTreeMap<String, Status> = BTreeMap::new();
        while let Ok(event) = board_events.recv().await {
            if let HaEvent::HealthChanged {
                component,
                to,
                cause,
                ..
            } = &event
            {
                statuses.insert(component.clone(), *to);
                let overall = Status::worst_of(statuses.values().copied());
                println!(
                    "board: {component} is {to}{} -> overall {overall}",
                    cause
                        .as_deref()
                        .map(|c| format!(" ({c})"))
                        .unwrap_or_default()
                );
            } else {
                println!("board: {}", event.name());
            }
        }
        statuses
    });

    // The component: a dependency recovering with backoff after it fails.
    let path = [
        (Status::Healthy, None),
        (Status::Degraded, Some("p95 latency 3x baseline")),
        (Status::Unhealthy, Some("connection refused")),
        (Status::Degraded, Some("reconnected, warming up")),
        (Status::Healthy, None),
    ];
    let mut from = Status::Unknown;
    let mut backoff = Backoff::new(BackoffConfig {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        ..BackoffConfig::default()
    });
    for (to, cause) in path {
        bus.publish(HaEvent::HealthChanged {
            at: SystemTime::now(),
            node: node.clone(),
            component: "orders-db".into(),
            from,
            to,
            cause: cause.map(str::to_owned),
        });
        from = to;
        if to == Status::Unhealthy {
            // Leader-only work: only a node that leads may fail over, and it says with which token.
            if let Some(lead) = gate.is_leader() {
                bus.publish(HaEvent::FailoverStarted {
                    at: SystemTime::now(),
                    node: node.clone(),
                    component: "orders-db".into(),
                    token: Some(lead.token),
                });
            }
        }
        let sleep = backoff.next().unwrap_or_default();
        println!(
            "component: next probe in {} ms (full-jitter backoff)",
            sleep.as_millis()
        );
        tokio::time::sleep(sleep).await;
    }

    // Subscriber 2: a slow auditor on a bus that keeps only 4 events.
    let small = EventBus::new(4);
    let mut auditor = small.subscribe();
    for n in 0..10 {
        small.publish(HaEvent::AnomalyDetected {
            at: SystemTime::now(),
            node: node.clone(),
            component: "orders-db".into(),
            rule: "consecutive_failures".into(),
            detail: format!("burst event {n}"),
        });
    }
    println!("publisher: sent 10 events to a bus of 4 without waiting");
    drop(small);
    loop {
        match auditor.recv().await {
            Ok(HaEvent::AnomalyDetected { detail, .. }) => println!("auditor: {detail}"),
            Ok(other) => println!("auditor: {}", other.name()),
            Err(RecvError::Lagged { missed }) => println!("auditor: missed {missed} events"),
            Err(_) => break,
        }
    }

    drop(bus);
    let statuses = board.await.unwrap_or_default();
    println!("final: {statuses:?}");
}
