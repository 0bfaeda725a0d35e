//! Model test: random schedules of partitions, slow requests and answers (process pauses),
//! crashes, step-downs, and the store's own faults — it loses every record (a restart without
//! persistence, a flush, an eviction) or its clock steps forward — over three electors on one
//! store, under paused tokio time. At every 5 ms step: at most one node holds a valid
//! leadership, and each new term's token is greater than the last.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FaultyStore, Invariants};
use ha_core::{Component, ComponentContext};
use ha_election::{Elector, ElectorConfig, LeaseStore, MemoryLeaseStore, testing};
use proptest::prelude::*;

const NODES: usize = 3;

#[derive(Clone, Debug)]
enum Fault {
    /// Node's requests and answers vanish for a while.
    Partition { node: usize, ms: u64 },
    /// Requests reach the store late and/or answers come back late (a pause around a request).
    Slow {
        node: usize,
        request_ms: u64,
        response_ms: u64,
        for_ms: u64,
    },
    /// The node is never heard from again.
    Crash { node: usize },
    /// The node gives up leadership if it has it.
    StepDown { node: usize },
    /// The store forgets every lease record (tokens keep growing, as the real stores' floors
    /// make them).
    LoseRecords,
    /// The store's clock steps forward: terms lapse early by its clock, records are forgotten
    /// early.
    StepStoreClock { ms: u64 },
}

fn fault() -> impl Strategy<Value = Fault> {
    let node = 0..NODES;
    prop_oneof![
        (node.clone(), 100u64..4_000).prop_map(|(node, ms)| Fault::Partition { node, ms }),
        (node.clone(), 0u64..3_000, 0u64..3_000, 100u64..5_000).prop_map(
            |(node, request_ms, response_ms, for_ms)| Fault::Slow {
                node,
                request_ms,
                response_ms,
                for_ms
            }
        ),
        node.clone().prop_map(|node| Fault::Crash { node }),
        node.prop_map(|node| Fault::StepDown { node }),
        Just(Fault::LoseRecords),
        (100u64..10_000).prop_map(|ms| Fault::StepStoreClock { ms }),
    ]
}

fn schedule() -> impl Strategy<Value = Vec<(u64, Fault)>> {
    proptest::collection::vec((0u64..1_500, fault()), 1..12)
}

async fn run(schedule: Vec<(u64, Fault)>) -> Vec<(usize, ha_core::FencingToken)> {
    let store = Arc::new(MemoryLeaseStore::new());
    let memory: Arc<dyn LeaseStore> = store.clone();
    let config = ElectorConfig::with_ttl(
        "model/leader",
        Duration::from_secs(2),
        Duration::from_millis(200),
    );
    let links: Vec<Arc<FaultyStore>> = (0..NODES)
        .map(|_| FaultyStore::new(memory.clone()))
        .collect();
    let mut electors: Vec<Elector> = Vec::new();
    for (i, link) in links.iter().enumerate() {
        let e = Elector::builder(link.clone())
            .config(config.clone())
            .build()
            .expect("valid config");
        e.start(ComponentContext::standalone(format!("n{i}")))
            .await
            .expect("starts");
        electors.push(e);
    }
    let refs: Vec<&Elector> = electors.iter().collect();
    let mut inv = Invariants::default();
    // Faults heal at their own times; keep (heal_at_step, node, what).
    let mut heals: Vec<(u64, usize, bool)> = Vec::new();
    let step = Duration::from_millis(5);
    // Fault times are gaps (ms) after the previous fault; turn them into absolute steps.
    let mut at = 0u64;
    let mut pending = schedule
        .into_iter()
        .map(|(gap_ms, fault)| {
            at += gap_ms / 5;
            (at, fault)
        })
        .peekable();
    for s in 0..4_000u64 {
        while let Some((_, fault)) = pending.next_if(|(when, _)| *when <= s) {
            match fault {
                Fault::Partition { node, ms } => {
                    links[node].partition(true);
                    heals.push((s + ms / 5, node, true));
                }
                Fault::Slow {
                    node,
                    request_ms,
                    response_ms,
                    for_ms,
                } => {
                    links[node].set_delays(
                        Duration::from_millis(request_ms),
                        Duration::from_millis(response_ms),
                    );
                    heals.push((s + for_ms / 5, node, false));
                }
                Fault::Crash { node } => {
                    links[node].partition(true);
                    heals.retain(|(_, n, _)| *n != node);
                }
                Fault::StepDown { node } => {
                    electors[node].step_down().await;
                }
                Fault::LoseRecords => testing::lose_records(&store),
                Fault::StepStoreClock { ms } => {
                    testing::step_store_clock(&store, Duration::from_millis(ms));
                }
            }
        }
        heals.retain(|&(when, node, partition)| {
            if when > s {
                return true;
            }
            if partition {
                links[node].partition(false);
            } else {
                links[node].set_delays(Duration::ZERO, Duration::ZERO);
            }
            false
        });
        inv.check(&refs);
        tokio::time::sleep(step).await;
    }
    inv.terms().to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn never_two_leaders_and_tokens_grow(schedule in schedule()) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let terms = runtime.block_on(run(schedule.clone()));
        // Someone led at some point unless every node was cut off from the start.
        let all_crashed_early = schedule.iter().filter(|(_, f)| matches!(f, Fault::Crash { .. })).count() >= NODES;
        prop_assert!(!terms.is_empty() || all_crashed_early, "nobody ever led: {schedule:?}");
    }
}
